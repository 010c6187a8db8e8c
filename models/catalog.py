"""The weights catalogue: every model id the service knows, with where its weights come from.

Each entry names its backend, the scales it offers, and for each scale one weight file with its sha256, its real
source URL pinned to a commit or a release (``revision``: never a moving branch) and its licence. Facts for the files
we mirror come from ``shared/weights/MANIFEST.tsv``; the Real-ESRGAN release files carry the sha256 and size that the
release assets are published with. A ``sha256`` of ``None`` means that no hash is published for that file (EDSR, and
ai-forever's Real-ESRGAN copies): :mod:`models.weights` refuses to fetch it unless the user says
``--trust-unhashed``, and then records the hash it saw, and holds the file to it from then on.

A ``file:PATH`` model id is not in the catalogue: :func:`get_entry` builds an ad-hoc spandrel entry for a user's own
model file, a ``diffusers:FOLDER`` id one for a diffusion pipeline saved with ``save_pretrained``, and an
``omdb:<id>`` id a placeholder for an OpenModelDB entry, whose facts (file, sha256, scale, licence) come from the
cached index (:func:`models.omdb.resolve`). Diffusion
entries name a Hugging Face hub repository (``hub_repo``) pinned to a commit (``hub_revision``) instead of files:
their weights live in the Hugging Face cache, not in ``weights_dir``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import UnknownModelError, WeightsMissingError

ANY_SCALE = "any"


@dataclass(frozen=True)
class WeightFile:
    """One weight file: where it lives under ``weights_dir`` and upstream, and what it must be.

    ``sha256`` None: no hash is published (fetching it takes ``--trust-unhashed``). ``size``: the exact size in bytes
    where it is known; ``max_size``: a ceiling for a file whose size is not known, so that a mirror cannot fill the
    disk (see :func:`models.weights.download_limit`). ``direct`` False: the only source is a page for a browser, so
    the file comes from a mirror or is put in place by hand, and is checked all the same.
    """

    path: str  # relative to weights_dir and to a mirror, e.g. "opencv/FSRCNN_x4.pb"
    url: str  # the real upstream download address, at ``revision``
    sha256: str | None
    size: int | None = None
    revision: str = ""  # the commit (40 hex digits) or release tag that ``url`` is pinned to
    max_size: int | None = None  # bytes; only for files whose size is not catalogued
    direct: bool = True  # False: ``url`` is a page that needs a browser (Mega, Google Drive); never downloaded


@dataclass(frozen=True)
class ModelEntry:
    id: str
    backend: str
    description: str
    license: str
    source: str
    scales: tuple[int, ...] | str = ANY_SCALE  # the native scales, or ANY_SCALE for resampling filters
    files: dict[int, WeightFile] = field(default_factory=dict)  # scale -> file (scale 0: a scale-free file)
    arch: str = ""  # backend-specific architecture name (the OpenCV dnn_superres algorithm, for example)
    kind: str = "upscaler"  # "upscaler", or "quality" for metric model files
    hub_repo: str = ""  # a Hugging Face hub repository whose snapshot (in the HF cache) holds the weights
    hub_revision: str = "main"  # the commit of hub_repo to load and fetch (catalogue entries pin one)

    def supports(self, scale: float) -> bool:
        return self.scales == ANY_SCALE or scale in self.scales

    def weight_files(self) -> list[WeightFile]:
        return list(self.files.values())


def _raw(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


_FSRCNN = ("Saafke/FSRCNN_Tensorflow", "6a4812c4ef1c4f5947d79beafa32a05a6eb4a94d")
_ESPCN = ("fannymonori/TF-ESPCN", "5c628eca82028161a53e1265cc3a5b571ab8625f")
_LAPSRN = ("fannymonori/TF-LapSRN", "fc51c90af1b5801a357abc919160d7ff4f24b997")
# No published hash for EDSR: pinned to a commit whose README documents the quantised .pb files, fetched only with
# --trust-unhashed (the hash seen is recorded then, and enforced after).
_EDSR = ("Saafke/EDSR_Tensorflow", "d63343aa607f9e81a74a49860d61933c484b8b50")
_EDSR_MAX_SIZE = 64 << 20  # the quantised graphs are about 38 MB (the README: "~40MB")
_CONTRIB = ("opencv/opencv_contrib", "2a5154a4479e841aa1282ef83d139c4870d17b8f")

_SHA = {  # from shared/weights/MANIFEST.tsv
    "opencv/FSRCNN_x2.pb": ("366b33f0084c7b3f2bf6724f0a2c77bca94fcec9d7b6d72389d330073b380d5c", 38973),
    "opencv/FSRCNN_x3.pb": ("efd38655a815908c6c8954db6052f128e76a735f1de657894c477d0dc0b64481", 40093),
    "opencv/FSRCNN_x4.pb": ("5c68d18db561aed8ead4ffedf1b897ea615baaf60ebf6c35f8e641f8fa4a21bf", 41661),
    "opencv/FSRCNN-small_x2.pb": ("429e4793d049c1ae16ddbbc322fd11c3c08831c0c20137390b4d098976a2b0d9", 9595),
    "opencv/FSRCNN-small_x3.pb": ("58e72d0c4231b8e754180e787d7348f45ae6230ee3c5af7dc12b558467f593f7", 10235),
    "opencv/FSRCNN-small_x4.pb": ("92a9f57c28494813b4dc073b51a300cb909401454d77541bcdc96b4d55901d02", 11131),
    "opencv/ESPCN_x2.pb": ("59f77351e1d7c0057bf6fe088b4a8a07e42c468c8c8aebb674a6b4ea1823221d", 86446),
    "opencv/ESPCN_x3.pb": ("0e667db7a431d14c32568ed79bf21701a64df8b1d162e48ca1f8800affe2c2b3", 92226),
    "opencv/ESPCN_x4.pb": ("e403f06309229cf36009cd8fb0da032ba7643fae9f15cf94fe562e8edf8fef47", 100323),
    "opencv/LapSRN_x2.pb": ("f59c86e6835bbca646dbd81588f07820dfe3bd09e3702976ae2d90b5fc0f0b21", 1356253),
    "opencv/LapSRN_x4.pb": ("d3e95c93cafae5ce5a8ed57ce9abf07f2de58da8c5d6d656b766774969835ee2", 2712798),
    "opencv/LapSRN_x8.pb": ("a00211938b2b4c7d23691525a9267d9d0bbb345cdb9f38a7fc917414a5a1884f", 4069183),
    "quality/brisque_model_live.yml": ("4c44c7eec9e5139830c0bb0e4a044c9cd351ba5bbc9e3798beca3243e2782ff4", 567815),
    "quality/brisque_range_live.yml": ("a18427f4f7ad087524bd0d63389649a3899b51ca6d44a4d5f8d8171f1f914a9c", 1356),
    "spandrel/RealESRGANv2-animevideo-xsx2.pth": (
        "27985aa2198711ecd72f9bb274ec7b164e018fc9ce2933daaa7c7ab36a2bd3fe",
        2419014,
    ),
    "spandrel/RealESRGANv2-animevideo-xsx4.pth": (
        "5e04b111c16d5b40deb8f8062d09fdff72fa80281fb9607be23b62650c08daff",
        2502086,
    ),
    "spandrel/DITN_Real_x4.pth": ("989dc21e2379c6924a6bd32696df0f1fa8cfd43dd557e1ae4126b97708695b5a", 1811277),
    "spandrel/DITN_Real_GAN_x4.pth": ("a103f07b5c605c2e23c23bfe44a880e10e7c019388a516f657fb13b0e7df1097", 1811277),
}


# The Real-ESRGAN release assets (xinntao/Real-ESRGAN, BSD-3-Clause): the sha256 and size each release file is
# published and widely pinned with (not mirrored here). Keyed by local path.
_RELEASED = {
    "spandrel/RealESRGAN_x4plus.pth": (
        "v0.1.0",
        "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
        67040989,
    ),
    "spandrel/RealESRGAN_x4plus_anime_6B.pth": (
        "v0.2.2.4",
        "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
        17938799,
    ),
    "spandrel/RealESRGAN_x2plus.pth": (
        "v0.2.1",
        "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
        67061725,
    ),
    "spandrel/realesr-general-x4v3.pth": (
        "v0.2.5.0",
        "8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292",
        4885111,
    ),
    "spandrel/realesr-animevideov3.pth": (
        "v0.2.5.0",
        "b8a8376811077954d82ca3fcf476f1ac3da3e8a68a4f4d71363008000a18b75d",
        2504012,
    ),
}


def _file(repo_commit: tuple[str, str], upstream_path: str, local_path: str, max_size: int | None = None) -> WeightFile:
    sha, size = _SHA.get(local_path, (None, None))
    return WeightFile(
        path=local_path,
        url=_raw(*repo_commit, upstream_path),
        sha256=sha,
        size=size,
        revision=repo_commit[1],
        max_size=None if size else max_size,
    )


def _opencv(
    mid: str,
    arch: str,
    stem: str,
    scales: tuple[int, ...],
    repo: tuple[str, str],
    folder: str,
    license: str,
    description: str,
    max_size: int | None = None,
) -> ModelEntry:
    return ModelEntry(
        id=mid,
        backend="opencv",
        arch=arch,
        scales=scales,
        description=description,
        license=license,
        source=f"https://github.com/{repo[0]}",
        files={s: _file(repo, f"{folder}/{stem}_x{s}.pb", f"opencv/{stem}_x{s}.pb", max_size) for s in scales},
    )


def _classical(mid: str, description: str) -> ModelEntry:
    return ModelEntry(id=mid, backend="classical", arch=mid, description=description, license="-", source="-")


_BETTER_REALESRGAN = ("Grey-Wind/Better-Real-ESRGAN", "bcd3416edd09383d8ec7153873999218556d3e9b")
_DITN = ("yongliuy/DITN", "98352a85ab2ac19e97c86c87a2a907021c814a5d")
_XINNTAO_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
# ai-forever's copies publish no hash we can pin: the URL is pinned to a hub commit, the size capped, and fetching
# takes --trust-unhashed.
_AI_FOREVER_REVISION = "0a00b8e4dc6dd1e1fe0ebb453d4ffeb3f52f89a4"
_AI_FOREVER_HUB = f"https://huggingface.co/ai-forever/Real-ESRGAN/resolve/{_AI_FOREVER_REVISION}"
_AI_FOREVER_MAX_SIZE = 96 << 20  # RRDBNet, 23 blocks: about 67 MB at every scale
# The diffusers snapshot of the Stable Diffusion x4 upscaler, pinned to a commit of its hub repository.
_SD_X4_REVISION = "572c99286543a273bfd17fac263db5a77be12c4c"
_XINNTAO_LICENSE = "BSD-3-Clause"


def _spandrel(
    mid: str,
    arch: str,
    scale: int,
    file_name: str,
    url: str,
    license: str,
    source: str,
    description: str,
    revision: str = "",
    max_size: int | None = None,
) -> ModelEntry:
    """A single-scale model loaded through spandrel; ``arch`` is the spandrel architecture id the file must hold.
    Its sha256 and size come from the MANIFEST (mirrored files) or the release's published values."""
    local = f"spandrel/{file_name}"
    sha: str | None
    size: int | None
    if local in _RELEASED:
        revision, sha, size = _RELEASED[local]
    else:
        sha, size = _SHA.get(local, (None, None))
    return ModelEntry(
        id=mid,
        backend="spandrel",
        arch=arch,
        scales=(scale,),
        description=description,
        license=license,
        source=source,
        files={
            scale: WeightFile(
                path=local, url=url, sha256=sha, size=size, revision=revision, max_size=None if size else max_size
            )
        },
    )


def _spandrel_mirrored(
    mid: str,
    arch: str,
    scale: int,
    file_name: str,
    repo: tuple[str, str],
    upstream_path: str,
    license: str,
    description: str,
) -> ModelEntry:
    """A spandrel model whose file is in ``shared/weights/spandrel``: URL pinned to the MANIFEST's commit."""
    return _spandrel(
        mid,
        arch,
        scale,
        file_name,
        _raw(*repo, upstream_path),
        license,
        f"https://github.com/{repo[0]}/blob/{repo[1]}/{upstream_path}",
        description,
        revision=repo[1],
    )


ENTRIES: tuple[ModelEntry, ...] = (
    _classical("nearest", "nearest neighbour (OpenCV INTER_NEAREST)"),
    _classical("bilinear", "bilinear (OpenCV INTER_LINEAR)"),
    _classical("bicubic", "MATLAB imresize bicubic: Keys a=-0.5, antialiased downscale, symmetric edges"),
    _classical("lanczos", "Lanczos, 8x8 taps (OpenCV INTER_LANCZOS4)"),
    _classical("area", "pixel-area averaging (OpenCV INTER_AREA; bilinear-like when enlarging)"),
    _opencv(
        "fsrcnn",
        "fsrcnn",
        "FSRCNN",
        (2, 3, 4),
        _FSRCNN,
        "models",
        "Apache-2.0",
        "FSRCNN (Dong et al. 2016), OpenCV dnn_superres, Y channel",
    ),
    _opencv(
        "fsrcnn-small",
        "fsrcnn",
        "FSRCNN-small",
        (2, 3, 4),
        _FSRCNN,
        "models",
        "Apache-2.0",
        "FSRCNN-s, the faster variant, OpenCV dnn_superres, Y channel",
    ),
    _opencv(
        "espcn",
        "espcn",
        "ESPCN",
        (2, 3, 4),
        _ESPCN,
        "export",
        "Apache-2.0",
        "ESPCN (Shi et al. 2016), OpenCV dnn_superres, Y channel",
    ),
    _opencv(
        "lapsrn",
        "lapsrn",
        "LapSRN",
        (2, 4, 8),
        _LAPSRN,
        "export",
        "Apache-2.0",
        "LapSRN (Lai et al. 2017), OpenCV dnn_superres, Y channel",
    ),
    _opencv(
        "edsr",
        "edsr",
        "EDSR",
        (2, 3, 4),
        _EDSR,
        "models",
        "not stated by the repository; check before use",
        "EDSR (Lim et al. 2017), OpenCV dnn_superres, RGB; large and slow on a CPU",
        max_size=_EDSR_MAX_SIZE,
    ),
    ModelEntry(
        id="brisque",
        backend="quality",
        kind="quality",
        scales=(),
        description="BRISQUE no-reference quality model (cv2.quality), used by upscale-mode metrics",
        license="Apache-2.0",
        source="https://github.com/opencv/opencv_contrib",
        files={
            0: _file(_CONTRIB, "modules/quality/samples/brisque_model_live.yml", "quality/brisque_model_live.yml"),
            1: _file(_CONTRIB, "modules/quality/samples/brisque_range_live.yml", "quality/brisque_range_live.yml"),
        },
    ),
    # --- spandrel: Real-ESRGAN and its family (PyTorch; pip install 'upscaled[gan]') ----------------------------
    *(
        _spandrel(
            f"realesrgan-x{s}",
            "ESRGAN",
            s,
            f"RealESRGAN_x{s}.pth",
            f"{_AI_FOREVER_HUB}/RealESRGAN_x{s}.pth",
            "not stated by the hub repository (ai-forever/Real-ESRGAN); check before use",
            "https://huggingface.co/ai-forever/Real-ESRGAN",
            f"Real-ESRGAN x{s} (RRDBNet, 23 blocks), ai-forever's weights; GAN-sharpened, for photos",
            revision=_AI_FOREVER_REVISION,
            max_size=_AI_FOREVER_MAX_SIZE,
        )
        for s in (2, 4, 8)
    ),
    _spandrel(
        "realesrgan-x4plus",
        "ESRGAN",
        4,
        "RealESRGAN_x4plus.pth",
        f"{_XINNTAO_RELEASES}/v0.1.0/RealESRGAN_x4plus.pth",
        _XINNTAO_LICENSE,
        "https://github.com/xinntao/Real-ESRGAN",
        "RealESRGAN_x4plus (RRDBNet, 23 blocks): real-world photos",
    ),
    _spandrel(
        "realesrgan-x4plus-anime-6b",
        "ESRGAN",
        4,
        "RealESRGAN_x4plus_anime_6B.pth",
        f"{_XINNTAO_RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
        _XINNTAO_LICENSE,
        "https://github.com/xinntao/Real-ESRGAN",
        "RealESRGAN_x4plus_anime_6B (RRDBNet, 6 blocks): drawings",
    ),
    _spandrel(
        "realesrgan-x2plus",
        "ESRGAN",
        2,
        "RealESRGAN_x2plus.pth",
        f"{_XINNTAO_RELEASES}/v0.2.1/RealESRGAN_x2plus.pth",
        _XINNTAO_LICENSE,
        "https://github.com/xinntao/Real-ESRGAN",
        "RealESRGAN_x2plus (RRDBNet, pixel-unshuffle input): photos",
    ),
    _spandrel(
        "realesr-general-x4v3",
        "Compact",
        4,
        "realesr-general-x4v3.pth",
        f"{_XINNTAO_RELEASES}/v0.2.5.0/realesr-general-x4v3.pth",
        _XINNTAO_LICENSE,
        "https://github.com/xinntao/Real-ESRGAN",
        "realesr-general-x4v3 (SRVGG compact, 32 convs): general",
    ),
    _spandrel(
        "realesr-animevideov3",
        "Compact",
        4,
        "realesr-animevideov3.pth",
        f"{_XINNTAO_RELEASES}/v0.2.5.0/realesr-animevideov3.pth",
        _XINNTAO_LICENSE,
        "https://github.com/xinntao/Real-ESRGAN",
        "realesr-animevideov3 (SRVGG compact, 16 convs): anime video",
    ),
    _spandrel_mirrored(
        "realesrgan-animevideo-xsx2",
        "Compact",
        2,
        "RealESRGANv2-animevideo-xsx2.pth",
        _BETTER_REALESRGAN,
        "Better.Real-ESRGAN/models/RealESRGANv2-animevideo-xsx2.pth",
        "AGPL-3.0 + author terms (upstream weights: xinntao/Real-ESRGAN release v0.2.3.0, BSD-3-Clause)",
        "RealESRGANv2-animevideo-xsx2 (SRVGG compact): anime video, x2; same file as Real-ESRGAN v0.2.3.0",
    ),
    _spandrel_mirrored(
        "realesrgan-animevideo-xsx4",
        "Compact",
        4,
        "RealESRGANv2-animevideo-xsx4.pth",
        _BETTER_REALESRGAN,
        "Better.Real-ESRGAN/models/RealESRGANv2-animevideo-xsx4.pth",
        "AGPL-3.0 + author terms (upstream weights: xinntao/Real-ESRGAN release v0.2.3.0, BSD-3-Clause)",
        "RealESRGANv2-animevideo-xsx4 (SRVGG compact): anime video, x4, the fastest here; same file "
        "as Real-ESRGAN v0.2.3.0",
    ),
    _spandrel_mirrored(
        "ditn-real-x4",
        "DITN",
        4,
        "DITN_Real_x4.pth",
        _DITN,
        "checkpoints/DITN_Real_x4.pth",
        "Apache-2.0 (LICENSE added in a later commit)",
        "DITN_Real_x4 (Liu et al. 2023): bicubic-degradation PSNR model, 32.10 dB Set5 x4 (Y)",
    ),
    _spandrel_mirrored(
        "ditn-real-gan-x4",
        "DITN",
        4,
        "DITN_Real_GAN_x4.pth",
        _DITN,
        "checkpoints/DITN_Real_GAN_x4.pth",
        "Apache-2.0 (LICENSE added in a later commit)",
        "DITN_Real_GAN_x4 (Liu et al. 2023): real-world degradations, GAN-trained",
    ),
    # --- diffusion (PyTorch + diffusers; pip install 'upscaled[diffusion]'): weights in the Hugging Face cache ------
    ModelEntry(
        id="sd-x4-upscaler",
        backend="diffusion",
        scales=(4,),
        description="Stable Diffusion x4 upscaler (text-guided latent diffusion, diffusers "
        "StableDiffusionUpscalePipeline): a GPU model, minutes per 128 px tile on a CPU",
        license="CreativeML Open RAIL++-M",
        source="https://huggingface.co/stabilityai/stable-diffusion-x4-upscaler",
        hub_repo="stabilityai/stable-diffusion-x4-upscaler",
        hub_revision=_SD_X4_REVISION,  # a commit, so that what loads is what was fetched and checked
    ),
)

CATALOG: dict[str, ModelEntry] = {e.id: e for e in ENTRIES}
assert len(CATALOG) == len(ENTRIES), "duplicate model id in the catalogue"


# --- user files: `model = "file:weights/4x-Something.pth"` ------------------------------------------------------
FILE_PREFIX = "file:"
MODEL_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")


def is_file_model(model_id: str) -> bool:
    return model_id.startswith(FILE_PREFIX)


def file_entry(model_id: str) -> ModelEntry:
    """An ad-hoc spandrel entry for a ``file:PATH`` model id. Its scale is whatever the loaded file says.

    The entry names no catalogue weight files (nothing to fetch or hash); the backend finds the file with
    :func:`resolve_model_file` when it loads.

    Raises:
        UnknownModelError: the id names no file, or a file type spandrel cannot read.
    """
    raw = model_id[len(FILE_PREFIX) :]
    if not raw.strip():
        raise UnknownModelError(f"{model_id!r} names no file; write file:PATH, e.g. file:weights/4x-Something.pth")
    if Path(raw).suffix.lower() not in MODEL_FILE_SUFFIXES:
        raise UnknownModelError(
            f"{model_id!r}: expected a model file ending in {', '.join(MODEL_FILE_SUFFIXES)}, "
            f"got {Path(raw).suffix or 'no extension'!r}"
        )
    return ModelEntry(
        id=model_id,
        backend="spandrel",
        arch="",
        scales=ANY_SCALE,
        source=raw,
        description=f"user-supplied model file {raw}, loaded with spandrel",
        license="unknown: user-supplied file",
    )


def resolve_model_file(model_id: str, weights_dir: Path | None = None) -> Path:
    """The file a ``file:PATH`` id names: PATH itself if absolute, else the first of ``./PATH`` and
    ``weights_dir/PATH`` that exists.

    Raises:
        UnknownModelError: not a usable ``file:`` id (see :func:`file_entry`).
        WeightsMissingError: no such file; the message lists the places looked at.
    """
    entry = file_entry(model_id)
    raw = Path(entry.source).expanduser()
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw] + ([weights_dir / raw] if weights_dir else [])
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise WeightsMissingError(f"model file for {model_id!r} not found; looked at {', '.join(map(str, candidates))}")


# --- saved diffusion pipelines: `model = "diffusers:/srv/models/sd-x4-upscaler"` -------------------------------
DIFFUSERS_PREFIX = "diffusers:"
DIFFUSERS_INDEX = "model_index.json"  # what save_pretrained writes at the top of a pipeline folder


def is_diffusers_model(model_id: str) -> bool:
    return model_id.startswith(DIFFUSERS_PREFIX)


def diffusers_entry(model_id: str) -> ModelEntry:
    """An ad-hoc diffusion entry for a ``diffusers:FOLDER`` model id. Its scale is whatever the loaded VAE gives.

    Raises:
        UnknownModelError: the id names no folder.
    """
    raw = model_id[len(DIFFUSERS_PREFIX) :]
    if not raw.strip():
        raise UnknownModelError(
            f"{model_id!r} names no folder; write diffusers:PATH to a folder saved with "
            f"save_pretrained, e.g. diffusers:/srv/models/sd-x4-upscaler"
        )
    return ModelEntry(
        id=model_id,
        backend="diffusion",
        scales=ANY_SCALE,
        source=raw,
        description=f"diffusion pipeline saved with save_pretrained in {raw}",
        license="unknown: user-supplied pipeline",
    )


def resolve_diffusers_folder(model_id: str, weights_dir: Path | None = None) -> Path:
    """The folder a ``diffusers:PATH`` id names: PATH itself if absolute, else the first of ``./PATH`` and
    ``weights_dir/PATH`` that holds a ``model_index.json``.

    Raises:
        UnknownModelError: not a usable ``diffusers:`` id (see :func:`diffusers_entry`).
        WeightsMissingError: no such pipeline folder; the message lists the places looked at.
    """
    entry = diffusers_entry(model_id)
    raw = Path(entry.source).expanduser()
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw] + ([weights_dir / raw] if weights_dir else [])
    for path in candidates:
        if (path / DIFFUSERS_INDEX).is_file():
            return path.resolve()
    raise WeightsMissingError(
        f"pipeline folder for {model_id!r} not found: none of {', '.join(map(str, candidates))} "
        f"holds a {DIFFUSERS_INDEX}; point it at a folder written by the pipeline's save_pretrained()"
    )


# --- OpenModelDB entries: `model = "omdb:4x-Nomos8kSC"` (models/omdb.py) ------------------------------------------
OMDB_PREFIX = "omdb:"
# OpenModelDB ids are file names in its repository (data/models/<id>.json): letters, digits and . _ + - only, so an
# id can name neither a folder nor a URL path of its own.
OMDB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def is_omdb_model(model_id: str) -> bool:
    return model_id.startswith(OMDB_PREFIX)


def omdb_entry(model_id: str) -> ModelEntry:
    """A placeholder spandrel entry for an ``omdb:<id>`` model id, before its facts are read from the cached index
    (:func:`models.omdb.resolve` gives the full entry: file, sha256, scale, architecture, licence).

    Raises:
        UnknownModelError: the id is empty or has characters an OpenModelDB id never has.
    """
    raw = model_id[len(OMDB_PREFIX) :]
    if not OMDB_ID.fullmatch(raw):
        raise UnknownModelError(
            f"{model_id!r} is not an OpenModelDB id; write omdb:<id> with the id as openmodeldb.info shows it, "
            "e.g. omdb:4x-Nomos8kSC (letters, digits and . _ + - only)"
        )
    return ModelEntry(
        id=model_id,
        backend="spandrel",
        arch="",
        scales=ANY_SCALE,
        source=f"https://openmodeldb.info/models/{raw}",
        description=f"OpenModelDB model {raw} (details in the cached index: `upscaled models show {model_id}`)",
        license="see the OpenModelDB entry",
    )


def model_label(model_id: str) -> str:
    """A short name for ``model_id`` that is safe inside a file name: the file's stem for ``file:`` ids, the
    folder's name for ``diffusers:`` ids, the OpenModelDB id for ``omdb:`` ids."""
    if is_omdb_model(model_id):
        return model_id[len(OMDB_PREFIX) :]
    if is_file_model(model_id) or is_diffusers_model(model_id):
        file = is_file_model(model_id)
        raw = Path(model_id[len(FILE_PREFIX if file else DIFFUSERS_PREFIX) :].rstrip("/"))
        stem = raw.stem if file else raw.name
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or ("file" if file else "diffusers")
    return model_id


def get_entry(model_id: str) -> ModelEntry:
    """The catalogue entry for ``model_id``; ``file:PATH`` ids get an ad-hoc spandrel entry (:func:`file_entry`),
    ``diffusers:FOLDER`` ids an ad-hoc diffusion entry (:func:`diffusers_entry`), ``omdb:<id>`` ids a placeholder
    (:func:`omdb_entry`; :func:`models.omdb.resolve` reads the rest from the cached index).

    Raises:
        UnknownModelError: no such id; the message lists the known ones.
    """
    if is_file_model(model_id):
        return file_entry(model_id)
    if is_omdb_model(model_id):
        return omdb_entry(model_id)
    if is_diffusers_model(model_id):
        return diffusers_entry(model_id)
    try:
        return CATALOG[model_id]
    except KeyError:
        known = ", ".join(e.id for e in ENTRIES if e.kind == "upscaler")
        raise UnknownModelError(
            f"unknown model {model_id!r}; known models: {known} (or omdb:<id> for an OpenModelDB model, "
            "file:PATH for a model file)"
        ) from None
