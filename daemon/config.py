"""Configuration: ``settings.toml`` plus ``UPSCALED_*`` environment overrides, checked before anything starts.

The file is named by ``UPSCALED_CONFIG`` (default ``./settings.toml``). Relative paths in it are taken relative to
the file's folder, so a service started from anywhere sees the same folders. A bad configuration raises
:class:`~daemon.errors.ConfigError` with a message that names the key and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import string
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from daemon.errors import ConfigError
from daemon.hooks import Hooks
from daemon.imageio import DEFAULT_PNG_COMPRESSION
from daemon.media.formats import OUTPUT_FORMATS
from daemon.protocol import BENCHMARK_METRICS, DOWNSCALES, UPSCALE_METRICS
from daemon.sizing import TargetSize, check_rule
from models import omdb
from models.backends import Backend, backend_of
from models.catalog import get_entry, is_omdb_model
from models.errors import UpscaledError
from models.registry import check_scale
from models.weights import entry_for

ENV_PREFIX = "UPSCALED_"
DEFAULT_CONFIG = "settings.toml"
DEFAULT_IGNORE = [".*", "*.part", "*.tmp", "*.crdownload", "Thumbs.db", "desktop.ini", "*.error.json", "*.prompt.txt"]
NAME_FIELDS = {"stem", "model", "scale", "ext", "folder", "rule", "width", "height", "date"}
# Rule keys of older versions that are a backend's parameters now: read from the rule's top level into `params`.
LEGACY_PARAM_KEYS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "noise_level", "seed")
# Rule keys added after fingerprints were first recorded: left out of the fingerprint while at their defaults, so a
# rule that does not use them keeps the fingerprint (and the finished jobs) it had.
_LATER_KEYS: tuple[str, ...] = ("width", "height", "max_side", "fit", "max_passes", "metadata")
# Rule keys that never change the pixels written: not in the fingerprint (the same content under a rule that differs
# only in these is the same job). compression changes the file's size, never a pixel. Every other key is in it;
# tests/unit/test_fingerprint.py refuses a key that is in none of the three.
_NOT_OUTPUT = ("folder", "device", "precision", "on_done", "on_failed", "compression", "allow_noncommercial")


class Rule(TargetSize, Hooks, BaseModel):
    """What to do with the images of one inbox folder (and the folders below it).

    The target-size keys (``width``, ``height``, ``max_side``, ``fit``, ``max_passes``) come from
    :class:`daemon.sizing.TargetSize`, the hooks (``on_done``, ``on_failed``) from :class:`daemon.hooks.Hooks`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str = Field(
        default="",
        description="The inbox folder the rule serves, with the folders below it that "
        'no deeper rule names; "" is the default rule (the inbox root and everything else).',
    )
    model: str = Field(
        default="bicubic",
        description="A model id (`upscaled models`), `omdb:<id>` for an OpenModelDB model "
        "(`upscaled models search`), `file:PATH` for a spandrel weight file, or `diffusers:FOLDER` for a saved "
        "diffusion pipeline.",
    )
    scale: float = Field(default=2, description="The model's native scale: it picks the weights (x2, x3, x4...).")
    outscale: float | None = Field(
        default=None,
        description="The final scale, when it is not `scale`: the model "
        "runs as many native passes as it needs (up to `max_passes`), then a Lanczos "
        "(enlarging) or area (reducing) resize finishes.",
    )
    mode: Literal["upscale", "benchmark"] = Field(
        default="upscale",
        description="`benchmark`: the input is the "
        "ground truth; the LR image is made from it and the output "
        "compared with it (PSNR/SSIM, docs/protocol.md).",
    )
    # The choices come from media/formats.FORMATS and protocol.DOWNSCALES at run time: pydantic checks them, a static
    # checker cannot read a Literal built from a tuple.
    format: Literal[OUTPUT_FORMATS] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="The output format; unset keeps the "
        "input's (BMP becomes PNG). heic and jxl need the `heif` and "
        "`jxl` extras.",
    )
    quality: int = Field(
        default=95,
        ge=1,
        le=100,
        description="jpg, webp, avif, heic and jxl quality (webp and jxl at 100 are lossless).",
    )
    compression: int = Field(
        default=DEFAULT_PNG_COMPRESSION,
        ge=0,
        le=9,
        description="png and tiff zlib level: 1 is fast (the default, measured in docs/formats.md), 9 is small.",
    )
    metadata: Literal["keep", "strip", "basic"] = Field(
        default="keep",
        description="`keep`: everything the output "
        "format holds (EXIF with orientation 1 and the new size, "
        "ICC, XMP, IPTC); `strip`: ICC only; `basic`: ICC and the "
        "capture date.",
    )
    naming: str = Field(
        default="{stem}.{model}.x{scale}.{ext}",
        description="The output file name: fields "
        "{stem}, {model}, {scale}, {ext}, {folder}, {rule} (its fingerprint), {width}, {height} "
        "(the output's) and {date} (the day the file was registered, UTC).",
    )
    device: str | None = Field(
        default=None, description="This rule's device (auto, cpu, cuda, cuda:N) instead of the service's."
    )
    metrics: list[str] | None = Field(
        default=None,
        description="The metrics to record; unset: every metric of the "
        "mode (upscale: brisque, lr_psnr_y, lr_ssim_y; benchmark: psnr_y, ssim_y, "
        "psnr_rgb, ssim_rgb, mse_rgb); []: none.",
    )
    downscale: Literal[DOWNSCALES] = Field(  # type: ignore[valid-type]
        default="matlab-bicubic",
        description="Benchmark mode: the kernel that makes the LR image from the ground truth.",
    )
    alpha: Literal["resize", "model"] = Field(
        default="resize", description="How an alpha channel is enlarged: a bicubic resize, or the model itself."
    )
    tile: int | None = Field(
        default=None,
        ge=32,
        description="The input tile side for models that tile; unset lets the backend choose from memory.",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description="torch models: auto "
        "is fp16 on CUDA where the model supports it, else "
        "fp32 (fp32 for 16-bit outputs).",
    )
    compare: bool = Field(
        default=True, description="Benchmark mode: also write HR | LR | output side by side as `<output>.compare.png`."
    )
    allow_noncommercial: bool = Field(
        default=False,
        description="Consent to a model whose licence forbids commercial use (CC-BY-NC-*, many OpenModelDB "
        "models): without it, start-up stops and names the licence.",
    )
    # The backend's own options, checked against its schema (models/backends.py). A `<image>.prompt.txt` beside an
    # input overrides the prompt for that image.
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The backend's own options, a `[rules.params]` "
        "table checked against its schema: diffusion models take prompt, "
        "negative_prompt, num_inference_steps, guidance_scale, noise_level and seed.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_params(cls, data: Any) -> Any:
        """Generation options at the rule's top level (before ``[rules.params]``) still work."""
        if isinstance(data, dict) and any(k in data for k in LEGACY_PARAM_KEYS):
            data = dict(data)
            params = dict(data.get("params") or {})
            for k in LEGACY_PARAM_KEYS:
                if k in data:
                    params.setdefault(k, data.pop(k))
            data["params"] = params
        return data

    @field_validator("folder")
    @classmethod
    def _folder(cls, v: str) -> str:
        p = PurePosixPath(v.strip("/"))
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"must be a folder inside the inbox, got {v!r}")
        return "" if str(p) == "." else str(p)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return None if v is None else check_device(v)

    @field_validator("naming")
    @classmethod
    def _naming(cls, v: str) -> str:
        fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        unknown = fields - NAME_FIELDS
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in {v!r}; use {sorted(NAME_FIELDS)}")
        sample = v.format(
            stem="a", model="m", scale="2", ext="png", folder="f", rule="r", width=1, height=1, date="2026-01-01"
        )
        if "/" in sample or "\\" in sample or sample in ("", ".", ".."):
            raise ValueError(f"must give a plain file name without folders, got {v!r}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        try:
            get_entry(v)
        except UpscaledError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float, info: ValidationInfo) -> float:
        model = info.data.get("model")
        if model is not None:  # None: the model itself was bad, and said so
            try:
                check_scale(model, v)
            except UpscaledError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("outscale")
    @classmethod
    def _outscale(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError(f"must be positive, got {v}")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        mode = info.data.get("mode", "upscale")
        allowed = BENCHMARK_METRICS if mode == "benchmark" else UPSCALE_METRICS
        bad = [m for m in (v or []) if m not in allowed]
        if bad:
            raise ValueError(f"{bad} are not available in {mode} mode; choose from {list(allowed)}")
        return v

    @model_validator(mode="after")
    def _params(self) -> Rule:
        """Check ``params`` against the backend's schema and store it complete (defaults filled in)."""
        try:
            backend = self.backend()
        except UpscaledError:  # a bad model id, reported by its own validator
            return self
        try:
            parsed = backend.parse_params(self.params)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            if backend.params.model_fields:
                raise ValueError(f"params: {problems}") from None
            raise ValueError(
                f"params: {self.model} (backend {backend.id}) takes no parameters, got {', '.join(sorted(self.params))}"
            ) from None
        object.__setattr__(self, "params", parsed.model_dump())
        return self

    @model_validator(mode="after")
    def _size(self) -> Rule:
        """A size the model cannot reach the way the rule asks (x16 from a x4 model that cannot take its own
        output) is refused at start, not quietly served by a Lanczos enlargement."""
        try:
            backend = self.backend()
        except UpscaledError:
            return self
        if backend.any_scale or self.mode == "benchmark":
            return self
        check = check_rule(
            self.scale,
            target=self if self.has_target else None,
            outscale=self.outscale,
            chainable=backend.chainable,
            model=self.model,
        )
        if not check.ok:
            raise ValueError(check.message)
        return self

    @model_validator(mode="after")
    def _benchmark(self) -> Rule:
        if self.mode == "benchmark" and (
            self.final_scale != self.scale or self.scale != int(self.scale) or self.has_target
        ):
            raise ValueError("mode: benchmark mode needs an integer scale and no outscale or target size")
        return self

    @property
    def final_scale(self) -> float:
        return self.outscale if self.outscale is not None else self.scale

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.metrics is not None:
            return tuple(self.metrics)
        return BENCHMARK_METRICS if self.mode == "benchmark" else UPSCALE_METRICS

    def backend(self) -> Backend:
        """The backend of this rule's model.

        Raises:
            UnknownModelError: the model id is unknown.
        """
        return backend_of(self.model)

    def model_params(self) -> Any:
        """``params`` as the backend's schema object, ready for the model call."""
        return self.backend().parse_params(self.params)

    def native_scale(self) -> float:
        """The scale the model runs at (a resampling filter goes straight to the final scale)."""
        return self.backend().native_scale(self.scale, self.final_scale)

    def with_prompt(self, prompt: str) -> Rule:
        """This rule with ``params.prompt`` replaced (a ``<image>.prompt.txt`` sidecar)."""
        return self.model_copy(update={"params": {**self.params, "prompt": prompt}})

    def model_problems(self, weights_dir: Path) -> list[str]:
        """What stops this rule's model from running here, checked at start-up: an ``omdb:`` entry not in the cached
        index, a licence that forbids commercial use without ``allow_noncommercial``, an architecture the installed
        spandrel does not load, a scale that is not the model's. Empty when it can run.

        Imports spandrel (and torch) for an ``omdb:`` model whose entry is cached, to check its architecture.
        """
        try:
            entry = entry_for(self.model, weights_dir)
        except UpscaledError as exc:
            return [str(exc)]
        problems = []
        if omdb.is_noncommercial(entry.license) and not self.allow_noncommercial:
            problems.append(
                f"{self.model} is licensed {entry.license}, which forbids commercial use; set "
                "allow_noncommercial = true on this rule to use it within that licence"
            )
        if is_omdb_model(self.model):
            model, _ = omdb.model_for(self.model, weights_dir)
            arch = omdb.arch_problem(model.architecture)
            if arch:
                problems.append(f"{self.model}: {arch}")
            if self.scale != model.scale:
                final = f" (and outscale = {self.final_scale:g} for a x{self.final_scale:g} result)"
                problems.append(
                    f"{self.model} is a x{model.scale} model, and the rule says scale = {self.scale:g}; set "
                    f"scale = {model.scale}{final if self.final_scale != model.scale else ''}"
                )
        return problems

    def fingerprint(self) -> str:
        """A short hash of everything that changes the output. Same file + same fingerprint = same job."""
        exclude = {*_NOT_OUTPUT, "params"}
        defaults = type(self).model_fields
        exclude |= {k for k in _LATER_KEYS if getattr(self, k) == defaults[k].get_default(call_default_factory=True)}
        data = self.model_dump(exclude=exclude)
        data.update(self.params)  # in it, flat, as the generation options were before they moved into params
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_device(v: str) -> str:
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")


class Settings(Hooks, BaseSettings):
    """The service's settings. See docs/configuration.md for every key (``on_done``/``on_failed`` here run for
    every rule, beside a rule's own)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    inbox: Path = Field(default=Path("inbox"), description="The watched folder.")
    outbox: Path = Field(default=Path("outbox"), description="Where outputs go, in the input's folder there.")
    archive: Path = Field(default=Path("archive"), description="Where inputs move once their output is recorded.")
    failed: Path = Field(default=Path("failed"), description="Where bad inputs move, beside `<name>.error.json`.")
    delete_inputs: bool = Field(default=False, description="Delete inputs instead of archiving them.")
    database: str = Field(
        default="sqlite:///var/upscaled.db",
        description="The history: a SQLAlchemy URL, SQLite "
        "by default; `postgresql+psycopg://...` for several daemons (docs/scaling.md).",
    )
    weights_dir: Path = Field(default=Path("weights"), description="The model weights (`upscaled weights fetch`).")
    weights_mirror: str = Field(
        default="",
        description='A folder or base URL laid out like weights/ to fetch from; "" downloads from the sources.',
    )
    model_index_url: str = Field(
        default=omdb.DEFAULT_INDEX_URL,
        description="Where `omdb:` models are looked up: a .tar.gz of OpenModelDB's repository (GitHub's archive "
        "by default) or a .json of id -> entry (the site's models.json, a mirror's copy); a URL or a path. Cached "
        "in weights_dir/omdb by `upscaled weights fetch omdb:<id>`.",
    )
    device: str | list[str] = Field(
        default="auto",
        description="auto, cpu, cuda, cuda:N, or a list such as "
        '["cuda:0", "cuda:1"]: `workers` inference threads on each.',
    )
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Inference threads per device (decode, encode, commit and metrics have their "
        "own threads either way). auto: one per GPU; on the CPU one per usable core, at most 4, each with its share "
        "of OpenCV's threads (docs/performance.md).",
    )
    settle_seconds: float = Field(
        default=1.0,
        ge=0,
        description="A file must keep its size and mtime this long (after its writer closed it) before it is taken.",
    )
    rescan_seconds: float = Field(
        default=60.0, gt=0, description="A full rescan of the inbox, for events the kernel dropped."
    )
    observer: Literal["inotify", "polling"] = Field(
        default="inotify", description="`polling` for NFS and SMB shares, where inotify sees nothing."
    )
    poll_seconds: float = Field(default=2.0, gt=0, description="The polling observer's interval.")
    ignore: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        description="Name patterns never taken (hidden files, partial downloads, our own reason and prompt files).",
    )
    max_pixels: int = Field(
        default=100_000_000,
        gt=0,
        description="Input pixels, all frames, checked on the header "
        "before decoding: more is refused as a decompression bomb.",
    )
    max_output_pixels: int = Field(
        default=400_000_000,
        gt=0,
        description="Output pixels, all frames, checked before inference (x4 of 100 MP would need about 70 GB).",
    )
    max_file_bytes: int = Field(
        default=2 << 30, gt=0, description="An input larger than this is refused before a byte of it is read."
    )
    max_frames: int = Field(default=1000, ge=1, description="Frames of an animated input; more is refused.")
    decode_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds one parse of an input (header, decode, metadata) may take in its sandbox process; past "
        "it the process is killed and the job fails as decode-timeout (docs/security.md).",
    )
    decode_memory_limit: int = Field(
        default=0,
        ge=0,
        description="Bytes of memory one parse may use in its sandbox process, on top of the interpreter; 0 derives "
        "it from max_pixels (32 bytes a pixel, plus 256 MiB). Past it the job fails as decode-limit.",
    )
    sandbox_processes: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Sandbox processes parsing inputs (each about 60 MB); the only place a stranger's bytes are "
        "parsed.",
    )
    max_recoveries: int = Field(
        default=2,
        ge=1,
        description="Times the service may die while a job is the only one in flight before that job fails as "
        "poison (its input to failed/); deaths with other jobs in flight do not count.",
    )
    max_attempts: int = Field(default=3, ge=1, description="Tries for a job that runs out of memory.")
    retry_seconds: float = Field(default=30.0, ge=0, description="The first retry's delay; it doubles per attempt.")
    retry_max_seconds: float = Field(
        default=600.0,
        ge=0,
        description="The retry delay's cap. A full disk and an "
        "unwritable outbox are retried until fixed, the input kept.",
    )
    stop_timeout: float = Field(
        default=120.0,
        ge=0,
        description="SIGTERM: how long the jobs in flight may take to "
        "finish; the ones still running are given back to the queue.",
    )
    umask: str = Field(default="027", description="Octal; every file the service creates, the database included.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="The log level.")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: readable text on a terminal, JSON lines otherwise (journald, pipes)."
    )
    http_listen: str = Field(
        default="",
        description='host:port serving /metrics (Prometheus), /livez and /readyz; "" is off (docs/metrics.md).',
    )
    http_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the http_listen endpoints answer besides localhost and the bound address (the name "
        "a scraper or proxy uses; *.example.org for its subdomains); other Host headers get 400. Bound to every "
        "interface with none given: any name.",
    )
    hung_seconds: float = Field(
        default=300.0,
        gt=0,
        description="A thread that makes no progress this long is stuck: /livez answers 503 (a busy thread beats "
        "at each stage, tile and step; a loop whose every pass raises makes none). Under a systemd watchdog, half "
        "of WatchdogSec if that is shorter.",
    )
    rules: list[Rule] = Field(default_factory=list, description="The `[[rules]]`: one per inbox folder (below).")
    # Several daemons on one inbox and one PostgreSQL database (docs/scaling.md). Per node:
    node_name: str = Field(
        default="",
        max_length=128,
        description='This daemon\'s node name, unique per daemon on one database; "" is the host name.',
    )
    serve_folders: list[str] | None = Field(
        default=None, description='The rule folders whose jobs this node runs ("" = the default rule); unset: all.'
    )
    heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often the node renews its row and its jobs' leases."
    )
    stale_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A running job whose lease is this old belongs "
        "to a dead node and is taken over (at least twice heartbeat_seconds).",
    )

    config_file: Path | None = Field(default=None, exclude=True)  # set by load_settings, not by users

    _toml_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str):
            return check_device(v)
        if not v:
            raise ValueError("must name at least one device")
        if len(set(v)) != len(v):
            raise ValueError(f"names a device twice: {v}")
        return [check_device(d) for d in v]

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto":
            return v
        n = int(v) if isinstance(v, str) and v.strip().isdigit() else v
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise ValueError(f'must be "auto" or a whole number from 1 to 64, got {v!r}')
        return n

    @field_validator("http_listen")
    @classmethod
    def _http_listen(cls, v: str) -> str:
        if v:
            from daemon.telemetry import parse_listen

            parse_listen(v)  # ValueError names the key
        return v

    @field_validator("umask")
    @classmethod
    def _umask(cls, v: str) -> str:
        try:
            value = int(v, 8)
        except ValueError:
            raise ValueError(f'must be an octal string like "027", got {v!r}') from None
        if not 0 <= value <= 0o777:
            raise ValueError(f"must be between 000 and 777, got {v!r}")
        return v

    @field_validator("rules")
    @classmethod
    def _unique_folders(cls, rules: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for r in rules:
            if r.folder in seen:
                raise ValueError(f"two rules for folder {r.folder!r}")
            seen.add(r.folder)
        return rules

    @field_validator("serve_folders")
    @classmethod
    def _serve_folders(cls, v: list[str] | None) -> list[str] | None:
        # Spelled as rule folders are: no leading or trailing "/", and "" (or ".") for the default rule.
        return None if v is None else ["" if f.strip("/") in ("", ".") else str(PurePosixPath(f.strip("/"))) for f in v]

    @model_validator(mode="after")
    def _node(self) -> Settings:
        if self.stale_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                f"stale_seconds ({self.stale_seconds:g}) must be at least twice heartbeat_seconds "
                f"({self.heartbeat_seconds:g}), or a live node's jobs would be taken over"
            )
        if self.serve_folders is not None:
            known = {r.folder for r in self.all_rules()}
            unknown = [f for f in self.serve_folders if f not in known]
            if unknown:
                raise ValueError(f"serve_folders: {unknown} are not rule folders; rule folders are {sorted(known)}")
        return self

    def devices(self) -> list[str]:
        """The devices this node's workers run on, each with ``workers`` worker threads."""
        return [self.device] if isinstance(self.device, str) else list(self.device)

    def worker_count(self) -> int:
        """Inference threads per device: ``workers``, or for ``auto`` one per GPU, and on a CPU-only node one per
        usable core (at most 4: more would hold more images in flight for no more cores' worth of speed)."""
        if self.workers != "auto":
            return self.workers
        from models.devices import cpu_without_torch
        from models.runtime import usable_cpus

        return min(4, usable_cpus()) if all(map(cpu_without_torch, self.devices())) else 1

    def cpu_workers(self) -> int:
        """The inference threads of this node that run on the CPU (they share its cores)."""
        from models.devices import cpu_without_torch

        return self.worker_count() * sum(map(cpu_without_torch, self.devices()))

    @property
    def default_device(self) -> str:
        """The device of one-off runs (``upscaled process``, ``bench``): the first of ``device``."""
        return self.devices()[0]

    def node(self) -> str:
        """This daemon's node name: ``node_name``, else the host name."""
        return self.node_name or socket.gethostname()

    # --- derived -----------------------------------------------------------------------------------------------
    def all_rules(self) -> list[Rule]:
        """The rules, with a default rule for the inbox root added when the file has none."""
        if any(r.folder == "" for r in self.rules):
            return list(self.rules)
        return [*self.rules, Rule(folder="")]

    def rule_for(self, rel_dir: str) -> Rule:
        """The rule of the deepest rule folder that contains ``rel_dir`` (a folder relative to the inbox)."""
        parts = PurePosixPath(rel_dir).parts if rel_dir not in ("", ".") else ()
        best = None
        for r in self.all_rules():
            rparts = PurePosixPath(r.folder).parts if r.folder else ()
            if parts[: len(rparts)] == rparts and (best is None or len(rparts) > len(best[0])):
                best = (rparts, r)
        assert best is not None  # the default rule matches everything
        return best[1]

    def sqlite_path(self) -> Path | None:
        prefix = "sqlite:///"
        if self.database.startswith(prefix):
            return Path(self.database[len(prefix) :])
        return None


def _resolve(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else (base / p)


def _describe(exc: ValidationError, file: Path | None) -> str:
    where = str(file) if file else "the defaults"
    lines = []
    for err in exc.errors():
        loc = err.get("loc", ())
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        env = ENV_PREFIX + str(loc[0]).upper() if loc else ""
        origin = f"{where}, or ${env}" if env and env in os.environ else where
        msg = err.get("msg", "").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{origin}: {key}: {msg}")
    return "bad configuration:\n  " + "\n  ".join(lines)


class LiveSettings:
    """The settings in force, in one holder that a service's parts share: a reload (SIGHUP) swaps them here, once, and
    each part reads them afresh at its next use. A queued job keeps the rule it was registered with."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @classmethod
    def of(cls, settings: Settings | LiveSettings) -> LiveSettings:
        """``settings`` when it is a holder already (a part of a service), else a holder of its own (a part used
        alone: ``upscaled process``, the bench, a test)."""
        return settings if isinstance(settings, LiveSettings) else cls(settings)


class UsesSettings:
    """A part that reads the settings in force: ``self.settings`` is its holder's current settings."""

    live: LiveSettings

    @property
    def settings(self) -> Settings:
        return self.live.settings


def load_settings(path: str | os.PathLike | None = None, check_paths: bool = True, **overrides: Any) -> Settings:
    """Read the configuration file (``path``, else ``$UPSCALED_CONFIG``, else ./settings.toml) and the env.

    Raises:
        ConfigError: the file is missing or unreadable, a key is unknown or invalid, or a path is unusable. With
            ``check_paths`` (start-up, ``check-config``) also: a rule's model cannot run here (an ``omdb:`` entry
            not cached, a non-commercial licence without ``allow_noncommercial``, an architecture spandrel does not
            load, the wrong scale).
    """
    file = Path(path or os.environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG).absolute()
    if not file.is_file():
        raise ConfigError(f"configuration file {file} does not exist (set UPSCALED_CONFIG or --config)")
    env_config = os.environ.pop(ENV_PREFIX + "CONFIG", None)  # it names the file; it is not a setting
    Settings._toml_file = file
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file)) from None
    except (OSError, ValueError) as exc:  # TOML syntax errors are ValueErrors
        raise ConfigError(f"{file}: cannot read the configuration: {exc}") from None
    finally:
        Settings._toml_file = None
        if env_config is not None:
            os.environ[ENV_PREFIX + "CONFIG"] = env_config
    base = file.parent
    updates: dict[str, Any] = {"config_file": file}
    for key in ("inbox", "outbox", "archive", "failed", "weights_dir"):
        updates[key] = _resolve(base, getattr(settings, key)).resolve()
    db = settings.database
    if db.startswith("sqlite:///") and not db.startswith("sqlite:////") and ":memory:" not in db:
        updates["database"] = "sqlite:///" + str((base / db[len("sqlite:///") :]).resolve())
    for key in ("weights_mirror", "model_index_url"):
        value = getattr(settings, key)
        if value and "://" not in value:
            updates[key] = str(_resolve(base, Path(value)).resolve())
    settings = settings.model_copy(update=updates)
    if check_paths:
        _check_paths(settings, file)
        _check_models(settings, file)
    return settings


def _check_models(s: Settings, file: Path) -> None:
    """What start-up needs of each rule's model on this host (:meth:`Rule.model_problems`), all problems at once."""
    lines = [
        f"{file}: rules[{i}].model: {problem}"
        for i, rule in enumerate(s.rules)
        for problem in rule.model_problems(s.weights_dir)
    ]
    if lines:
        raise ConfigError("bad configuration:\n  " + "\n  ".join(lines))


def _check_paths(s: Settings, file: Path) -> None:
    folders = {"inbox": s.inbox, "outbox": s.outbox, "archive": s.archive, "failed": s.failed}
    for key, p in folders.items():
        if p.exists() and not p.is_dir():
            raise ConfigError(f"bad configuration:\n  {file}: {key}: {p} exists and is not a folder")
        anchor = p
        while not anchor.exists():
            anchor = anchor.parent
        if not os.access(anchor, os.W_OK | os.X_OK):
            raise ConfigError(f"bad configuration:\n  {file}: {key}: {p} is not writable")
    if len(set(folders.values())) != len(folders):
        raise ConfigError(f"bad configuration:\n  {file}: inbox, outbox, archive and failed must be four folders")
    # No folder inside another, either way: an inbox inside the outbox feeds every output back in as a new job, and
    # an outbox inside the inbox does the same. The database and the weights are not the inbox writers' to touch.
    for key, p in folders.items():
        for other, q in folders.items():
            if key != other and q in p.parents:
                raise ConfigError(f"bad configuration:\n  {file}: {key}: {p} must not be inside the {other} {q}")
    kept: list[tuple[str, Path | None]] = [("database", s.sqlite_path()), ("weights_dir", s.weights_dir)]
    for key, where in kept:
        if where is not None and (where == s.inbox or s.inbox in where.resolve().parents):
            raise ConfigError(f"bad configuration:\n  {file}: {key}: {where} must not be inside the inbox {s.inbox}")
