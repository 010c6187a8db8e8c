"""Configuration: ``settings.toml`` plus ``UPSCALED_*`` environment overrides, checked before anything starts.

The file is named by ``UPSCALED_CONFIG`` (default ``./settings.toml``). Relative paths in it are taken relative to
the file's folder, so a service started from anywhere sees the same folders. A bad configuration raises
:class:`~models.errors.ConfigError` with a message that names the key and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import string
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from daemon.errors import ConfigError
from models.backends import DEFAULT_GUIDANCE, DEFAULT_NOISE_LEVEL, DEFAULT_STEPS, MAX_NOISE_LEVEL, MAX_STEPS
from models.catalog import get_entry
from models.errors import UpscaledError
from models.registry import check_scale

ENV_PREFIX = "UPSCALED_"
DEFAULT_CONFIG = "settings.toml"
DEFAULT_IGNORE = [".*", "*.part", "*.tmp", "*.crdownload", "Thumbs.db", "desktop.ini", "*.error.json",
                  "*.prompt.txt"]
FORMATS = ("png", "jpg", "webp", "tiff")
UPSCALE_METRICS = ("brisque", "lr_psnr_y", "lr_ssim_y")
BENCHMARK_METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "mse_rgb")
NAME_FIELDS = {"stem", "model", "scale", "ext", "folder", "rule"}
# Rule options that only diffusion models take; they change the output, so they are part of the fingerprint.
GENERATION_FIELDS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "noise_level", "seed")


class Rule(BaseModel):
    """What to do with the images of one inbox folder (and the folders below it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str = ""  # relative to the inbox; "" is the default rule
    model: str = "bicubic"
    scale: float = 2  # the model's native scale (picks its weights)
    outscale: float | None = None  # final scale; a Lanczos/area resize finishes where it differs from `scale`
    mode: Literal["upscale", "benchmark"] = "upscale"
    format: Literal["png", "jpg", "webp", "tiff"] | None = None  # None keeps the input's format where it can
    quality: int = Field(default=95, ge=1, le=100)  # jpg and webp (webp 100 = lossless)
    compression: int = Field(default=6, ge=0, le=9)  # png and tiff zlib level: 1 is fast, 9 is small
    naming: str = "{stem}.{model}.x{scale}.{ext}"
    device: str | None = None  # overrides the service's device
    metrics: list[str] | None = None  # None: every metric of the mode; []: none
    downscale: Literal["matlab-bicubic", "cv2-cubic", "area"] = "matlab-bicubic"  # benchmark mode's LR kernel
    alpha: Literal["resize", "model"] = "resize"  # how the alpha channel is enlarged
    tile: int | None = Field(default=None, ge=32)  # input tile side; None lets the backend choose
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # torch models; auto: fp16 on CUDA, else fp32
    compare: bool = True  # benchmark mode: also write HR | LR | SR side by side
    # Diffusion models only (sd-x4-upscaler, diffusers:FOLDER). A `<image>.prompt.txt` beside an input overrides
    # `prompt` for that image. See models/backends.py for why 25 steps.
    prompt: str = Field(default="", max_length=2000)  # the text encoder reads the first 77 tokens
    negative_prompt: str = Field(default="", max_length=2000)
    num_inference_steps: int = Field(default=DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=DEFAULT_GUIDANCE, ge=0, le=50)  # > 1: classifier-free guidance
    noise_level: int = Field(default=DEFAULT_NOISE_LEVEL, ge=0, le=MAX_NOISE_LEVEL)  # noise added to the input
    seed: int = Field(default=0, ge=0, le=2**63 - 1)  # same input + same rule = same output

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
        sample = v.format(stem="a", model="m", scale="2", ext="png", folder="f", rule="r")
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
    def _generation_options(self) -> Rule:
        if self.takes_generation():
            return self
        fields = type(self).model_fields
        given = [k for k in GENERATION_FIELDS if getattr(self, k) != fields[k].default]
        if given:
            raise ValueError(f"{', '.join(given)}: only diffusion models (sd-x4-upscaler, diffusers:FOLDER) take "
                             f"generation options; {self.model} is a {get_entry(self.model).backend} model")
        return self

    @model_validator(mode="after")
    def _benchmark(self) -> Rule:
        if self.mode == "benchmark" and (self.final_scale != self.scale or self.scale != int(self.scale)):
            raise ValueError("mode: benchmark mode needs an integer scale and no different outscale")
        return self

    @property
    def final_scale(self) -> float:
        return self.outscale if self.outscale is not None else self.scale

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.metrics is not None:
            return tuple(self.metrics)
        return BENCHMARK_METRICS if self.mode == "benchmark" else UPSCALE_METRICS

    def takes_generation(self) -> bool:
        """Whether the model is a diffusion model, which takes the generation options."""
        try:
            return get_entry(self.model).backend == "diffusion"
        except UpscaledError:  # a bad model id, reported by its own validator
            return False

    def generation(self) -> dict[str, Any] | None:
        """The generation options for the model call (prompt, seed, ...), or None for a model that takes none."""
        return {k: getattr(self, k) for k in GENERATION_FIELDS} if self.takes_generation() else None

    def fingerprint(self) -> str:
        """A short hash of everything that changes the output. Same file + same fingerprint = same job."""
        exclude = {"folder", "device", "precision"}  # how to compute, like the device
        if not self.takes_generation():  # always at their defaults there: left out, so older fingerprints hold
            exclude |= set(GENERATION_FIELDS)
        data = self.model_dump(exclude=exclude)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_device(v: str) -> str:
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")


class Settings(BaseSettings):
    """The service's settings. See the README's configuration reference for every key."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    inbox: Path = Path("inbox")
    outbox: Path = Path("outbox")
    archive: Path = Path("archive")
    failed: Path = Path("failed")
    delete_inputs: bool = False
    database: str = "sqlite:///var/upscaled.db"
    weights_dir: Path = Path("weights")
    weights_mirror: str = ""
    device: str | list[str] = "auto"  # a list: one set of `workers` worker threads per device
    workers: int = Field(default=1, ge=1, le=64)  # worker threads per device
    settle_seconds: float = Field(default=1.0, ge=0)
    rescan_seconds: float = Field(default=60.0, gt=0)
    observer: Literal["inotify", "polling"] = "inotify"
    poll_seconds: float = Field(default=2.0, gt=0)
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    max_pixels: int = Field(default=100_000_000, gt=0)  # decoded input pixels; larger is a decompression bomb
    max_attempts: int = Field(default=3, ge=1)  # for out-of-memory failures
    retry_seconds: float = Field(default=30.0, ge=0)  # first backoff; doubles per attempt
    retry_max_seconds: float = Field(default=600.0, ge=0)  # backoff cap; disk-full and unwritable outbox retry forever
    stop_timeout: float = Field(default=120.0, ge=0)  # SIGTERM: how long the current job may take to finish
    umask: str = "027"  # octal; applies to every file the service creates, the database included
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    rules: list[Rule] = Field(default_factory=list)
    # Several daemons on one inbox and one PostgreSQL database (README, "Scaling out"). Per node:
    node_name: str = Field(default="", max_length=128)  # unique per daemon; "" means this host's name
    serve_folders: list[str] | None = None  # rule folders whose jobs this node runs ("" = default rule); None: all
    heartbeat_seconds: float = Field(default=5.0, gt=0)  # how often the node renews its row and its jobs' leases
    stale_seconds: float = Field(default=30.0, gt=0)  # a running job whose lease is this old is taken over

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

    @field_validator("umask")
    @classmethod
    def _umask(cls, v: str) -> str:
        try:
            value = int(v, 8)
        except ValueError:
            raise ValueError(f"must be an octal string like \"027\", got {v!r}") from None
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
        return None if v is None else ["" if f.strip("/") in ("", ".") else str(PurePosixPath(f.strip("/")))
                                       for f in v]

    @model_validator(mode="after")
    def _node(self) -> Settings:
        if self.stale_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(f"stale_seconds ({self.stale_seconds:g}) must be at least twice heartbeat_seconds "
                             f"({self.heartbeat_seconds:g}), or a live node's jobs would be taken over")
        if self.serve_folders is not None:
            known = {r.folder for r in self.all_rules()}
            unknown = [f for f in self.serve_folders if f not in known]
            if unknown:
                raise ValueError(f"serve_folders: {unknown} are not rule folders; rule folders are {sorted(known)}")
        return self

    def devices(self) -> list[str]:
        """The devices this node's workers run on, each with ``workers`` worker threads."""
        return [self.device] if isinstance(self.device, str) else list(self.device)

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
            return Path(self.database[len(prefix):])
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


def load_settings(path: str | os.PathLike | None = None, check_paths: bool = True, **overrides: Any) -> Settings:
    """Read the configuration file (``path``, else ``$UPSCALED_CONFIG``, else ./settings.toml) and the env.

    Raises:
        ConfigError: the file is missing or unreadable, a key is unknown or invalid, or a path is unusable.
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
        updates["database"] = "sqlite:///" + str((base / db[len("sqlite:///"):]).resolve())
    if settings.weights_mirror and "://" not in settings.weights_mirror:
        updates["weights_mirror"] = str(_resolve(base, Path(settings.weights_mirror)).resolve())
    settings = settings.model_copy(update=updates)
    if check_paths:
        _check_paths(settings, file)
    return settings


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
    for key in ("outbox", "archive", "failed"):
        p = folders[key]
        if p == s.inbox or s.inbox in p.parents:
            raise ConfigError(f"bad configuration:\n  {file}: {key}: {p} must not be inside the inbox {s.inbox}")
    if len(set(folders.values())) != len(folders):
        raise ConfigError(f"bad configuration:\n  {file}: inbox, outbox, archive and failed must be four folders")
