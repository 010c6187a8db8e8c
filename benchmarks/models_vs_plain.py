"""Our ``up(uint8)`` against the plain library call a user would write, per backend, on the same images, in one run.

    python benchmarks/models_vs_plain.py [--rounds 9] [--only opencv,spandrel] [--json PATH]

The baselines are the model calls of a user's ten-line loop (decoding and encoding are the same in both and left
out; ``benchmarks/throughput.py`` measures whole files through the service):

- OpenCV: ``cv2.dnn_superres.DnnSuperResImpl.upsample(bgr)`` (FSRCNN, ESPCN, LapSRN x4);
- spandrel: ``spandrel.ModelLoader().load_from_file(path)``, then ``x = from_numpy(rgb).permute(2, 0, 1)[None]
  .float().div(255)``, ``model(x)``, ``.mul(255).round().byte()`` (RealESRGANv2-animevideo-xsx4);
- classical: ``cv2.resize(bgr, ..., INTER_LANCZOS4)`` on 8 bits;
- diffusion: ``StableDiffusionUpscalePipeline.__call__`` on one 128 px image (the tiny pipeline of
  :mod:`models.testing`: the real weights are several GB; same code path, three steps).

Each round runs every case's plain call and ours back to back (which first alternates), each repeated until it takes
0.3 s, and the ratio is plain time / our time within a round (> 1: ours is faster), as a median over the rounds with
its range: a CPU shared with other work slows the two calls of a round alike. The "same output" column compares the
bytes (channels BGR/RGB matched).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.devices import build_info  # noqa: E402
from models.registry import LoadContext, ModelCache  # noqa: E402
from models.weights import fetch  # noqa: E402

SET5 = ROOT.parent / "shared" / "datasets" / "Set5"
MIRROR = ROOT.parent / "shared" / "weights"


@dataclass
class Case:
    name: str
    backend: str
    plain: Callable[[], list[np.ndarray]]  # returns RGB uint8 outputs, one per image
    ours: Callable[[], list[np.ndarray]]
    images: int
    plain_s: list[float] = field(default_factory=list)
    ours_s: list[float] = field(default_factory=list)
    note: str = ""
    repeats: int = 1


def photos(set5: Path, size: tuple[int, int]) -> list[np.ndarray]:
    """The five Set5 pictures, resized to (h, w) = ``size``, RGB uint8."""
    import cv2

    h, w = size
    out = []
    for path in sorted((set5 / "HR").glob("*.png")):
        bgr = cv2.imread(str(path))
        interp = cv2.INTER_AREA if bgr.shape[0] * bgr.shape[1] > h * w else cv2.INTER_CUBIC
        out.append(np.ascontiguousarray(cv2.resize(bgr, (w, h), interpolation=interp)[:, :, ::-1]))
    if not out:
        sys.exit(f"no Set5 pictures under {set5}/HR")
    return out


def opencv_cases(weights: Path, set5: Path) -> list[Case]:
    import cv2

    cases = []
    for model, stem, algo, size in [
        ("fsrcnn", "FSRCNN", "fsrcnn", (80, 120)),
        ("fsrcnn", "FSRCNN", "fsrcnn", (320, 480)),
        ("espcn", "ESPCN", "espcn", (320, 480)),
        ("lapsrn", "LapSRN", "lapsrn", (320, 480)),
    ]:
        sr = cv2.dnn_superres.DnnSuperResImpl_create()
        sr.readModel(str(weights / "opencv" / f"{stem}_x4.pb"))
        sr.setModel(algo, 4)
        up = ModelCache().get(model, 4, LoadContext(weights))[0]
        rgbs = photos(set5, size)[: 2 if model == "lapsrn" else 5]  # LapSRN takes seconds per image here
        bgrs = [np.ascontiguousarray(a[:, :, ::-1]) for a in rgbs]
        cases.append(
            Case(
                f"{model} x4 {size[0]}x{size[1]}",
                "opencv",
                lambda sr=sr, bgrs=bgrs: [sr.upsample(b)[:, :, ::-1] for b in bgrs],
                lambda up=up, rgbs=rgbs: [up(a) for a in rgbs],
                len(rgbs),
            )
        )
    return cases


def spandrel_cases(weights: Path, set5: Path) -> list[Case]:
    import spandrel
    import torch

    up = ModelCache().get("realesrgan-animevideo-xsx4", 4, LoadContext(weights, "cpu"))[0]
    plain = spandrel.ModelLoader().load_from_file(weights / "spandrel" / "RealESRGANv2-animevideo-xsx4.pth").eval()
    rgbs = photos(set5, (320, 480))[:2]

    def loop() -> list[np.ndarray]:
        outs = []
        with torch.inference_mode():
            for a in rgbs:
                x = torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255)
                outs.append(plain(x)[0].permute(1, 2, 0).mul(255).round().byte().numpy())
        return outs

    note = f"threads {torch.get_num_threads()}, channels_last {up.channels_last}"
    return [
        Case(
            "realesrgan-animevideo-xsx4 x4 320x480",
            "spandrel",
            loop,
            lambda: [up(a) for a in rgbs],
            len(rgbs),
            note=note,
        )
    ]


def classical_cases(set5: Path) -> list[Case]:
    import cv2

    up = ModelCache().get("lanczos", 4, LoadContext(Path(".")))[0]
    rgbs = photos(set5, (320, 480))
    bgrs = [np.ascontiguousarray(a[:, :, ::-1]) for a in rgbs]
    return [
        Case(
            "lanczos x4 320x480",
            "classical",
            lambda: [cv2.resize(b, None, fx=4, fy=4, interpolation=cv2.INTER_LANCZOS4)[:, :, ::-1] for b in bgrs],
            lambda: [up(a) for a in rgbs],
            len(rgbs),
        )
    ]


def diffusion_cases(tmp: Path, set5: Path) -> list[Case]:
    import torch

    from models.testing import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp / "tiny")
    up = ModelCache().get(f"diffusers:{folder}", 4, LoadContext(folder.parent, "cpu"))[0]
    rgb = photos(set5, (128, 128))[0]
    params = {"num_inference_steps": 3, "seed": 1, "prompt": "a photo"}

    def plain() -> list[np.ndarray]:
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255)
        y = up.pipe(
            prompt="a photo",
            image=x,
            num_inference_steps=3,
            guidance_scale=9.0,
            noise_level=20,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
        ).images
        return [y[0].permute(1, 2, 0).mul(255).round().byte().numpy()]

    return [
        Case(
            "tiny SD x4 128x128, 3 steps",
            "diffusion",
            plain,
            lambda: [up(rgb, params)],
            1,
            note="noise drawn by position, not by one generator: different pixels by design",
        )
    ]


def run(cases: list[Case], rounds: int, min_seconds: float = 0.3) -> None:
    """Time every case: each round runs the plain call and ours back to back (which one first alternates), each
    repeated until it takes ``min_seconds``, so that both see the same load on a shared CPU."""
    for case in cases:  # warm-up (kernel selection, allocators, caches), and how many repeats make a measurement
        case.plain()
        case.ours()
        t0 = time.perf_counter()
        case.plain()
        case.repeats = max(1, round(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    for r in range(rounds):
        for case in cases:
            pair = [(case.plain, case.plain_s), (case.ours, case.ours_s)]
            for fn, times in pair if r % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                for _ in range(case.repeats):
                    fn()
                times.append((time.perf_counter() - t0) / case.repeats)


def same_output(case: Case) -> str:
    a, b = case.plain(), case.ours()
    diff = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b, strict=True)]
    changed = sum(int((d > 0).sum()) for d in diff)
    total = sum(d.size for d in diff)
    if not changed:
        return "identical"
    return f"{changed} of {total} values differ (max {max(int(d.max()) for d in diff)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="opencv,spandrel,classical,diffusion")
    ap.add_argument("--mirror", type=Path, default=MIRROR)
    ap.add_argument("--set5", type=Path, default=SET5)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "models_vs_plain.json")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        wanted = [
            m
            for b, ms in {"opencv": ["fsrcnn", "espcn", "lapsrn"], "spandrel": ["realesrgan-animevideo-xsx4"]}.items()
            if b in only
            for m in ms
        ]
        bad = [r for r in fetch(weights, wanted, mirror=str(args.mirror)) if r.status not in ("fetched", "present")]
        if bad:
            sys.exit(f"could not fetch weights: {bad}")
        cases: list[Case] = []
        if "opencv" in only:
            cases += opencv_cases(weights, args.set5)
        if "spandrel" in only:
            cases += spandrel_cases(weights, args.set5)
        if "classical" in only:
            cases += classical_cases(args.set5)
        if "diffusion" in only:
            cases += diffusion_cases(Path(tmp), args.set5)
        run(cases, args.rounds)
        rows = []
        for case in cases:
            ratios = [p / o for p, o in zip(case.plain_s, case.ours_s, strict=True)]
            rows.append(
                dict(
                    case=case.name,
                    backend=case.backend,
                    images=case.images,
                    repeats=case.repeats,
                    plain_ms=1000 * statistics.median(case.plain_s) / case.images,
                    ours_ms=1000 * statistics.median(case.ours_s) / case.images,
                    ratio=statistics.median(ratios),
                    ratio_low=min(ratios),
                    ratio_high=max(ratios),
                    same_output=same_output(case),
                    note=case.note,
                )
            )
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = dict(
        cpus=os.cpu_count(),
        usable=len(os.sched_getaffinity(0)),
        python=platform.python_version(),
        load=os.getloadavg()[0],
        **build_info(),
    )
    print(
        f"{when}; {machine}; {args.rounds} rounds; ratio = plain time / our time in the same round (> 1: ours is "
        "faster), median and range over the rounds"
    )
    print("| case | plain ms/img | ours ms/img | ratio | range | same output |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        note = f" ({r['note']})" if r["note"] else ""
        print(
            f"| {r['case']} | {r['plain_ms']:.1f} | {r['ours_ms']:.1f} | **{r['ratio']:.2f}** | "
            f"{r['ratio_low']:.2f}-{r['ratio_high']:.2f} | {r['same_output']}{note} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(when=when, machine=machine, rounds=args.rounds, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
