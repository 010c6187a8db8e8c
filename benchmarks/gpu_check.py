"""One run on a CUDA host that checks what no CPU can: the torch backends on a real GPU. Prints a short table.

    python3 benchmarks/gpu_check.py [--json OUT.json] [--weights DIR]   # on the GPU host (see docs/gpu.md)
    python3 benchmarks/gpu_check.py --cpu-smoke                         # here: the same script, small, on the CPU

What it runs, and which of issue 17's items 1-13 each check exercises for real on a GPU:

- routing (5, 9): ``auto``, ``cuda`` and ``cuda:0`` resolve to one device and load one model there; bf16 allowed by
  the GPU's compute capability;
- fp16 fallback (6, 11): a model that overflows fp16 falls back to fp32, its windows resized for fp32; under auto a
  float32 (16-bit) input runs in fp32, a uint8 one in fp16;
- oom split, spandrel (1, 7, 12): a memory cap (``set_per_process_memory_fraction``) between the peaks of two window
  sizes: the large window runs out of memory (whatever the allocator or cuBLAS raises), is split, and the result
  matches an uncapped run;
- windows fixed at load (7, 8): 70 % of the free memory taken by another tensor between two calls: same window side,
  same bytes;
- two workers (7, 8): three threads on one GPU, one model and two models: every output equals the one-thread output;
- spandrel throughput (issue 11): xsx4 on 320x480 and 1024x1024, ours (uint8) against a plain fp16 loop on the GPU;
- diffusion (4, 10): the tiny SD x4 pipeline at 512x512 -> 2048x2048 in 128 px windows; fp16 UNet, fp32 VAE;
- diffusion oom split (1): a memory cap between the peaks of a 128 px and a 64 px window;
- diffusion fallback (3): NaN latents in fp16 reload the pipeline in fp32; a reload that fails keeps the fp16 one;
- diffusion syncs (13): CUDA's sync debug mode counts host/GPU syncs per call at 4 and 12 steps;
- determinism (7, 13): the same input twice gives the same bytes (TF32 switches printed).

Item 2 (position-keyed noise) and item 12's message matching are device-independent and tested on the CPU
(tests/integration/test_diffusion.py, tests/unit/test_models_runtime.py). With ``--cpu-smoke`` every check runs on
the CPU at small sizes, and the ones that need a GPU (memory caps, sync counting) say ``skip``; a test runs this mode
so that the script is known to work before a GPU is lent.

Exit status: 0 when no check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

XSX4 = "realesrgan-animevideo-xsx4"


@dataclass
class Check:
    name: str
    items: str
    status: str = "ok"  # ok, FAIL, skip
    detail: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


class Run:
    """The checks of one run, and what they share (device, sizes, weights, a scratch folder)."""

    def __init__(self, cpu_smoke: bool, weights: Path, scratch: Path) -> None:
        import torch

        self.torch = torch
        self.smoke = cpu_smoke
        self.device = "cpu" if cpu_smoke else "cuda:0"
        self.weights = weights
        self.scratch = scratch
        self.checks: list[Check] = []
        self.side = 48 if cpu_smoke else 1024  # the "real size" inputs
        self.rng = np.random.default_rng(0)

    def check(self, name: str, items: str, fn: Callable[[Check], None], gpu_only: bool = False) -> None:
        c = Check(name, items)
        self.checks.append(c)
        if gpu_only and self.smoke:
            c.status, c.detail = "skip", "needs a GPU"
            return
        t0 = time.perf_counter()
        try:
            fn(c)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, and the next check runs
            c.status = "FAIL"
            c.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            c.data["traceback"] = traceback.format_exc()
        c.seconds = time.perf_counter() - t0
        self.free()

    def free(self) -> None:
        if not self.smoke:
            import gc

            gc.collect()
            self.torch.cuda.empty_cache()
            self.torch.cuda.set_per_process_memory_fraction(1.0)

    def image(self, h: int, w: int) -> np.ndarray:
        """A smooth, textured RGB uint8 picture (the same for a given size)."""
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        rgb = np.stack(
            [
                0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0),
                0.3 + 0.4 * x / w,
                0.5 + 0.25 * np.sin((x + 2 * y) / 17.0),
            ],
            axis=2,
        )
        noise = np.random.default_rng(h * 7919 + w).normal(0, 0.03, rgb.shape)
        return np.clip(np.rint((rgb + noise) * 255), 0, 255).astype(np.uint8)

    def ctx(self, **kw):
        from models.registry import LoadContext

        return LoadContext(self.weights, kw.pop("device", self.device), **kw)

    def peak(self, fn: Callable[[], object]) -> int:
        """Peak bytes allocated on the GPU while ``fn`` runs (above what was allocated before)."""
        torch = self.torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def cap(self, nbytes: int) -> None:
        """Let this process allocate at most ``nbytes`` more than it holds now."""
        torch = self.torch
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + nbytes) / total))


# --- the checks -----------------------------------------------------------------------------------------------------
def routing(r: Run, c: Check) -> None:
    from models import devices
    from models.registry import ModelCache
    from models.runtime import choose_precision

    torch = r.torch
    cache = ModelCache()
    names = ["cpu"] if r.smoke else ["auto", "cuda", "cuda:0"]
    ups = [cache.get(XSX4, 4, r.ctx(device=n))[0] for n in names]
    assert all(u is ups[0] for u in ups), "device aliases loaded several models"
    assert len(cache.loaded()) == 1
    param = next(ups[0].model.descriptor.model.parameters())
    assert str(param.device) == ("cpu" if r.smoke else "cuda:0"), param.device
    out = ups[0](r.image(64, 80))
    assert out.shape == (256, 320, 3) and out.dtype == np.uint8
    c.data.update(
        devices=[devices.resolve(n) for n in names],
        precision=ups[0].precision,
        memory_used=devices.memory_used(),
        build=devices.build_info(),
    )
    if not r.smoke:
        cap = torch.cuda.get_device_capability(0)
        bf16 = choose_precision("bf16", "cuda:0", torch, model="check") == "bf16" if cap >= (8, 0) else None
        c.data.update(gpu=torch.cuda.get_device_name(0), capability=f"{cap[0]}.{cap[1]}", bf16=bf16)
        assert ups[0].precision == "fp16"
    c.detail = f"{names} -> {c.data['devices'][0]}, precision {ups[0].precision}"


def fp16_fallback(r: Run, c: Check) -> None:
    from models.registry import ModelCache
    from models.testing import compact_state

    torch = r.torch
    path = r.scratch / "2x-Overflow.pth"
    torch.save(compact_state(2, overflow_fp16=True), path)
    model = f"file:{path}"
    img = r.image(40, 48)
    fp32 = ModelCache().get(model, 2, r.ctx(precision="fp32"))[0]
    reference = fp32(img)
    # On the GPU, auto is fp16; on the CPU the smoke run asks for fp16 explicitly.
    up = ModelCache().get(model, 2, r.ctx(precision="fp16" if r.smoke else "auto"))[0]
    assert up.precision == "fp16", up.precision
    bpp16, side16 = up.bytes_per_px, up.window_side()
    out = up(img)
    assert (up.precision, up.fallbacks) == ("fp16->fp32", 1), (up.precision, up.fallbacks)
    assert up.bytes_per_px == 2 * bpp16 and up.window_side() <= side16
    diff = int(np.abs(out.astype(int) - reference).max())
    assert diff <= 1, diff
    c.data.update(bytes_per_px=[bpp16, up.bytes_per_px], window=[side16, up.window_side()], max_diff=diff)
    # Item 11: under auto on CUDA, a float32 (16-bit) input runs on an fp32 copy, a uint8 one in fp16.
    if not r.smoke:
        xsx4 = ModelCache().get(XSX4, 4, r.ctx())[0]
        ref32 = ModelCache().get(XSX4, 4, r.ctx(precision="fp32"))[0]
        f = img.astype(np.float32) / 255
        got = xsx4(f)
        assert xsx4.precision == "fp32", xsx4.precision
        c.data["float32_vs_fp32_max"] = float(np.abs(got - ref32(f)).max())
        xsx4(img)
        assert xsx4.precision == "fp16"
    c.detail = (
        f"fp16 -> fp32 after {up.fallbacks} fallback, bytes/px {bpp16:.0f} -> {up.bytes_per_px:.0f}, window "
        f"{side16} -> {up.window_side()}, max diff to fp32 {diff} level"
    )


def oom_split_spandrel(r: Run, c: Check) -> None:
    from models.registry import ModelCache

    up = ModelCache().get(XSX4, 4, r.ctx())[0]
    img = r.image(1024, 1024)
    big, small = up.with_tile(1024), up.with_tile(512)
    reference = big(img)
    peak_big, peak_small = r.peak(lambda: big(img)), r.peak(lambda: small(img))
    r.cap((peak_big + peak_small) // 2)
    out = big(img)
    splits = up.model.splitter.splits
    r.free()
    assert splits >= 1, f"no split (peaks {peak_big} and {peak_small})"
    # The split windows meet in cross-faded bands, where fp16 sums and the blend's rounding differ a little.
    diff = np.abs(out.astype(int) - reference)
    assert diff.max() <= 3 and diff.mean() < 0.05, (diff.max(), diff.mean())
    c.data.update(
        peak_mb=[peak_big / 2**20, peak_small / 2**20],
        splits=splits,
        cap=up.model.splitter.cap,
        max_diff=int(diff.max()),
        mean_diff=float(diff.mean()),
    )
    c.detail = (
        f"cap between {peak_small / 2**20:.0f} and {peak_big / 2**20:.0f} MB: {splits} split(s), window "
        f"cap {up.model.splitter.cap}, max diff {int(diff.max())}"
    )


def fixed_windows(r: Run, c: Check) -> None:
    from models.registry import ModelCache

    torch = r.torch
    up = ModelCache().get(XSX4, 4, r.ctx())[0]
    img = r.image(r.side, r.side)
    first, side = up(img), up.window_side()
    hog = None
    if not r.smoke:  # take most of the free memory, as another worker's model would
        free, _ = torch.cuda.mem_get_info()
        hog = torch.empty(int(free * 0.7), dtype=torch.uint8, device="cuda:0")
    second, side2 = up(img), up.window_side()
    del hog
    assert side == side2 and first.tobytes() == second.tobytes()
    c.detail = f"window {side} px before and after {'70 % of free memory was taken' if not r.smoke else 'a call'}"


def two_workers(r: Run, c: Check) -> None:
    from models.registry import ModelCache
    from models.testing import compact_state

    torch = r.torch
    path = r.scratch / "2x-Compact.pth"
    torch.save(compact_state(2, num_feat=16, num_conv=4, seed=3), path)
    cache = ModelCache()
    a = cache.get(XSX4, 4, r.ctx())[0]
    b = cache.get(f"file:{path}", 2, r.ctx())[0]
    images = [r.image(r.side // 2 + 8 * i, r.side // 2) for i in range(4)]
    alone = {(m, i): up(img) for m, up in (("a", a), ("b", b)) for i, img in enumerate(images)}
    got: dict = {}
    errors: list[BaseException] = []

    def worker(name: str, up, order: list[int]) -> None:
        try:
            for i in order:
                got[(name, i)] = up(images[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=("a", a, [0, 1, 2, 3])),
        threading.Thread(target=worker, args=("a", a, [3, 2, 1, 0])),
        threading.Thread(target=worker, args=("b", b, [0, 1, 2, 3])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    same = all(got[k].tobytes() == alone[k].tobytes() for k in got)
    assert same, "an output changed when two workers shared the GPU"
    c.detail = f"3 threads, 2 models, {len(got)} outputs equal to the one-thread outputs"


def spandrel_throughput(r: Run, c: Check) -> None:
    import spandrel

    from models.registry import ModelCache

    torch = r.torch
    up = ModelCache().get(XSX4, 4, r.ctx())[0]
    plain = spandrel.ModelLoader().load_from_file(r.weights / "spandrel" / "RealESRGANv2-animevideo-xsx4.pth")
    plain = plain.to(torch.device(r.device)).eval()
    half = not r.smoke
    if half:
        plain = plain.half()

    def loop(img: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(img).to(r.device).permute(2, 0, 1)[None].float().div(255)
            y = plain(x.half() if half else x)
            return y[0].permute(1, 2, 0).float().mul(255).round().byte().cpu().numpy()

    rows = []
    sizes = [(80, 120)] if r.smoke else [(320, 480), (1024, 1024)]
    for h, w in sizes:
        imgs = [r.image(h + i, w) for i in range(3 if r.smoke else 8)]
        for fn in (loop, up):  # warm-up
            fn(imgs[0])
        times = {"plain": [], "ours": []}
        for _ in range(2 if r.smoke else 3):
            for name, fn in (("plain", loop), ("ours", up)):
                if not r.smoke:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for img in imgs:
                    fn(img)
                times[name].append(time.perf_counter() - t0)
        a, b = loop(imgs[0]), up(imgs[0])
        diff = np.abs(a.astype(int) - b)
        rows.append(
            dict(
                size=f"{h}x{w}",
                plain_img_s=len(imgs) / min(times["plain"]),
                ours_img_s=len(imgs) / min(times["ours"]),
                ratio=min(times["plain"]) / min(times["ours"]),
                max_diff=int(diff.max()),
                differing=float((diff > 0).mean()),
            )
        )
    c.data["rows"] = rows
    c.detail = "; ".join(
        f"{x['size']}: ours {x['ours_img_s']:.1f} img/s, plain {x['plain_img_s']:.1f}, "
        f"ratio {x['ratio']:.2f}, max diff {x['max_diff']}"
        for x in rows
    )


def tiny_pipeline(r: Run) -> Path:
    from models.testing import build_tiny_pipeline

    folder = r.scratch / "tiny" / "pipe"
    if not folder.exists():
        build_tiny_pipeline(r.scratch / "tiny")
    return folder


def diffusion(r: Run, c: Check) -> None:
    from models.registry import ModelCache

    folder = tiny_pipeline(r)
    up = ModelCache().get(f"diffusers:{folder}", 4, _diff_ctx(r, folder))[0]
    side = 32 if r.smoke else 512
    img = r.image(side, side)
    steps = 2 if r.smoke else 10
    t0 = time.perf_counter()
    out = up(img, {"num_inference_steps": steps, "seed": 1})
    seconds = time.perf_counter() - t0
    assert out.shape == (4 * side, 4 * side, 3) and out.dtype == np.uint8
    pipe = up.pipe
    dtypes = (str(pipe.unet.dtype), str(pipe.text_encoder.dtype), str(pipe.vae.dtype))
    if not r.smoke:
        assert dtypes == ("torch.float16", "torch.float16", "torch.float32"), dtypes
    c.data.update(seconds=seconds, dtypes=dtypes, precision=up.precision)
    c.detail = f"{side}x{side} -> {4 * side}x{4 * side}, {steps} steps, {seconds:.1f} s, unet/text/vae {dtypes}"


def _diff_ctx(r: Run, folder: Path, **kw):
    from models.registry import LoadContext

    return LoadContext(folder.parent, kw.pop("device", r.device), **kw)


def diffusion_oom(r: Run, c: Check) -> None:
    from models.registry import ModelCache

    folder = tiny_pipeline(r)
    up = ModelCache().get(f"diffusers:{folder}", 4, _diff_ctx(r, folder, tile=128))[0]
    small = up.with_tile(64)
    img = r.image(128, 128)
    params = {"num_inference_steps": 2, "seed": 4}
    peak_big, peak_small = r.peak(lambda: up(img, params)), r.peak(lambda: small(img, params))
    r.cap((peak_big + peak_small) // 2)
    out = up(img, params)
    splits, cap = up.model.splitter.splits, up.model.splitter.cap
    r.free()
    assert splits >= 1, f"no split (peaks {peak_big} and {peak_small})"
    assert out.shape == (512, 512, 3)
    c.data.update(peak_mb=[peak_big / 2**20, peak_small / 2**20], splits=splits, cap=cap)
    c.detail = f"cap between {peak_small / 2**20:.0f} and {peak_big / 2**20:.0f} MB: {splits} split(s), window {cap}"


def diffusion_fallback(r: Run, c: Check) -> None:
    from models.errors import WeightsCorruptError
    from models.registry import ModelCache

    torch = r.torch  # noqa: F841 - used by the hook below
    folder = r.scratch / "fallback-pipe"
    if not folder.exists():
        shutil.copytree(tiny_pipeline(r), folder)
    precision = "bf16" if r.smoke else "auto"  # bf16 on the CPU stands in for the GPU's fp16
    img = r.image(32, 40)
    params = {"num_inference_steps": 2, "seed": 2}
    reference = ModelCache().get(f"diffusers:{folder}", 4, _diff_ctx(r, folder, precision="fp32"))[0](img, params)
    up = ModelCache().get(f"diffusers:{folder}", 4, _diff_ctx(r, folder, precision=precision))[0]
    reduced = up.pipe
    reduced.unet.register_forward_hook(lambda _m, _a, out: (torch.full_like(out[0], float("nan")),))
    folder.rename(folder.with_name("moved"))  # the fp32 reload fails for real
    try:
        up(img, params)
        raise AssertionError("the reload from a missing folder did not fail")
    except WeightsCorruptError:
        pass
    finally:
        folder.with_name("moved").rename(folder)
    assert up.pipe is reduced and up.fallbacks == 0
    out = up(img, params)
    assert up.precision.endswith("->fp32") and up.fallbacks == 1, up.precision
    diff = int(np.abs(out.astype(int) - reference).max())
    assert diff <= 1, diff
    c.detail = f"failed reload kept the {up.model.precision.loaded} pipeline; then {up.precision}, max diff {diff}"


def diffusion_syncs(r: Run, c: Check) -> None:
    from models.registry import ModelCache

    torch = r.torch
    folder = tiny_pipeline(r)
    up = ModelCache().get(f"diffusers:{folder}", 4, _diff_ctx(r, folder, tile=64))[0]
    img = r.image(64, 64)
    counts = {}
    for steps in (4, 12):
        up(img, {"num_inference_steps": steps})  # warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                up(img, {"num_inference_steps": steps})
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
    c.data["syncs"] = counts
    grows = counts[12] - counts[4]
    assert grows < 8, f"syncs grow with the steps: {counts}"
    c.detail = f"syncs per window: {counts[4]} at 4 steps, {counts[12]} at 12 (no per-step sync if equal)"


def determinism(r: Run, c: Check) -> None:
    from models.registry import ModelCache

    torch = r.torch
    up = ModelCache().get(XSX4, 4, r.ctx())[0]
    img = r.image(r.side // 2, r.side // 2 + 8)
    a, b = up(img), up(img)
    assert a.tobytes() == b.tobytes()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    c.detail = f"same bytes twice; TF32 matmul/cudnn allowed: {tf32}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="run every check on the CPU at small sizes")
    ap.add_argument(
        "--weights",
        type=Path,
        help="a folder laid out like weights/ (default: ../shared/weights, or "
        "gpu-weights/ in the repository when carried)",
    )
    ap.add_argument("--json", type=Path, help="write every check's data here")
    args = ap.parse_args()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA GPU here; use --cpu-smoke to run the checks on the CPU", file=sys.stderr)
        return 2
    candidates = [args.weights] if args.weights else [ROOT / "gpu-weights", ROOT.parent / "shared" / "weights"]
    source = next((p for p in candidates if p and (p / "spandrel").is_dir()), None)
    if source is None:
        print(f"no weights in {[str(p) for p in candidates]}", file=sys.stderr)
        return 2
    from models.weights import fetch

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        weights = scratch / "weights"
        bad = [x for x in fetch(weights, [XSX4], mirror=str(source)) if x.status not in ("fetched", "present")]
        if bad:
            print(f"could not fetch {XSX4}: {bad}", file=sys.stderr)
            return 2
        r = Run(args.cpu_smoke, weights, scratch)
        r.check("routing", "5, 9", lambda c: routing(r, c))
        r.check("fp16 fallback", "6, 11", lambda c: fp16_fallback(r, c))
        r.check("oom split (spandrel)", "1, 7, 12", lambda c: oom_split_spandrel(r, c), gpu_only=True)
        r.check("windows fixed at load", "7, 8", lambda c: fixed_windows(r, c))
        r.check("two workers", "7, 8", lambda c: two_workers(r, c))
        r.check("spandrel throughput", "-", lambda c: spandrel_throughput(r, c))
        r.check("diffusion", "4, 10", lambda c: diffusion(r, c))
        r.check("diffusion oom split", "1", lambda c: diffusion_oom(r, c), gpu_only=True)
        r.check("diffusion fallback", "3", lambda c: diffusion_fallback(r, c))
        r.check("diffusion syncs", "13", lambda c: diffusion_syncs(r, c), gpu_only=True)
        r.check("determinism", "7, 13", lambda c: determinism(r, c))
    from models.devices import build_info

    where = "CPU smoke run" if args.cpu_smoke else torch.cuda.get_device_name(0)
    print(f"gpu_check on {where}; {build_info()}")
    print("| check | items | status | s | detail |")
    print("| --- | --- | --- | --- | --- |")
    for c in r.checks:
        print(f"| {c.name} | {c.items} | {c.status} | {c.seconds:.1f} | {c.detail} |")
    for c in r.checks:
        if c.status == "FAIL":
            print(f"\n--- {c.name} ---\n{c.data.get('traceback', '')}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                dict(
                    where=where,
                    build=build_info(),
                    checks=[
                        dict(
                            name=c.name,
                            items=c.items,
                            status=c.status,
                            seconds=c.seconds,
                            detail=c.detail,
                            data={k: v for k, v in c.data.items() if k != "traceback"},
                        )
                        for c in r.checks
                    ],
                ),
                indent=2,
                default=str,
            )
            + "\n"
        )
    return 1 if any(c.status == "FAIL" for c in r.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
