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
from daemon.hooks import Hooks
from daemon.imageio import DEFAULT_PNG_COMPRESSION
from daemon.media.formats import OUTPUT_FORMATS
from daemon.protocol import BENCHMARK_METRICS, DOWNSCALES, UPSCALE_METRICS
from daemon.sizing import TargetSize, check_rule
from models.backends import Backend, backend_of
from models.catalog import get_entry
from models.errors import UpscaledError
from models.registry import check_scale

ENV_PREFIX = "UPSCALED_"
DEFAULT_CONFIG = "settings.toml"
DEFAULT_IGNORE = [".*", "*.part", "*.tmp", "*.crdownload", "Thumbs.db", "desktop.ini", "*.error.json",
                  "*.prompt.txt"]
FORMATS = ("png", "jpg", "webp", "tiff")
NAME_FIELDS = {"stem", "model", "scale", "ext", "folder", "rule", "width", "height", "date"}
# Rule keys of older versions that are a backend's parameters now: read from the rule's top level into `params`.
LEGACY_PARAM_KEYS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "noise_level", "seed")
# Rule keys added after fingerprints were first recorded: left out of the fingerprint while at their defaults, so a
# rule that does not use them keeps the fingerprint (and the finished jobs) it had.
_LATER_KEYS: tuple[str, ...] = ("width", "height", "max_side", "fit", "max_passes", "metadata")
# Rule keys that never change the pixels written: not in the fingerprint (the same content under a rule that differs
# only in these is the same job). compression changes the file's size, never a pixel.
_NOT_OUTPUT = ("folder", "device", "precision", "params", "on_done", "on_failed", "compression")


class Rule(TargetSize, Hooks, BaseModel):
    """What to do with the images of one inbox folder (and the folders below it).

    The target-size keys (``width``, ``height``, ``max_side``, ``fit``, ``max_passes``) come from
    :class:`daemon.sizing.TargetSize`, the hooks (``on_done``, ``on_failed``) from :class:`daemon.hooks.Hooks`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str = ""  # relative to the inbox; "" is the default rule
    model: str = "bicubic"
    scale: float = 2  # the model's native scale (picks its weights)
    outscale: float | None = None  # final scale; a Lanczos/area resize finishes where it differs from `scale`
    mode: Literal["upscale", "benchmark"] = "upscale"
    format: Literal[OUTPUT_FORMATS] | None = None  # None keeps the input's format where it can
    quality: int = Field(default=95, ge=1, le=100)  # jpg, webp, avif, heic, jxl (webp and jxl 100 = lossless)
    compression: int = Field(default=DEFAULT_PNG_COMPRESSION, ge=0, le=9)  # png/tiff: 1 is fast, 9 is small
    metadata: Literal["keep", "strip", "basic"] = "keep"  # EXIF/XMP/IPTC kept; strip: ICC only; basic: ICC + date
    naming: str = "{stem}.{model}.x{scale}.{ext}"
    device: str | None = None  # overrides the service's device
    metrics: list[str] | None = None  # None: every metric of the mode; []: none
    downscale: Literal[DOWNSCALES] = "matlab-bicubic"  # benchmark mode's LR kernel (daemon/protocol.py)
    alpha: Literal["resize", "model"] = "resize"  # how the alpha channel is enlarged
    tile: int | None = Field(default=None, ge=32)  # input tile side; None lets the backend choose
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # torch models; auto: fp16 on CUDA, else fp32
    compare: bool = True  # benchmark mode: also write HR | LR | SR side by side
    # The backend's own options, checked against its schema (models/backends.py): for diffusion models the
    # prompt, negative_prompt, num_inference_steps, guidance_scale, noise_level and seed. A `<image>.prompt.txt`
    # beside an input overrides the prompt for that image.
    params: dict[str, Any] = Field(default_factory=dict)

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
        sample = v.format(stem="a", model="m", scale="2", ext="png", folder="f", rule="r", width=1, height=1,
                          date="2026-01-01")
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
            raise ValueError(f"params: {self.model} (backend {backend.id}) takes no parameters, got "
                             f"{', '.join(sorted(self.params))}") from None
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
        check = check_rule(self.scale, target=self if self.has_target else None, outscale=self.outscale,
                           chainable=backend.chainable, model=self.model)
        if not check.ok:
            raise ValueError(check.message)
        return self

    @model_validator(mode="after")
    def _benchmark(self) -> Rule:
        if self.mode == "benchmark" and (self.final_scale != self.scale or self.scale != int(self.scale)
                                         or self.has_target):
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

    def fingerprint(self) -> str:
        """A short hash of everything that changes the output. Same file + same fingerprint = same job."""
        exclude = set(_NOT_OUTPUT)
        defaults = type(self).model_fields
        exclude |= {k for k in _LATER_KEYS if getattr(self, k) == defaults[k].get_default(call_default_factory=True)}
        data = self.model_dump(exclude=exclude)
        data.update(self.params)  # flat, as the generation options were before they moved into params
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_device(v: str) -> str:
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")


class Settings(Hooks, BaseSettings):
    """The service's settings. See docs/configuration.md for every key (``on_done``/``on_failed`` here run for
    every rule, beside a rule's own)."""

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
    max_pixels: int = Field(default=100_000_000, gt=0)  # decoded input pixels, all frames: a decompression bomb
    max_output_pixels: int = Field(default=400_000_000, gt=0)  # checked before inference: x4 of 100 MP needs ~70 GB
    max_file_bytes: int = Field(default=2 << 30, gt=0)  # an input larger than this is refused before it is read
    max_frames: int = Field(default=1000, ge=1)  # frames of an animated input
    max_attempts: int = Field(default=3, ge=1)  # for out-of-memory failures
    retry_seconds: float = Field(default=30.0, ge=0)  # first backoff; doubles per attempt
    retry_max_seconds: float = Field(default=600.0, ge=0)  # backoff cap; disk-full and unwritable outbox retry forever
    stop_timeout: float = Field(default=120.0, ge=0)  # SIGTERM: how long the current job may take to finish
    umask: str = "027"  # octal; applies to every file the service creates, the database included
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"  # auto: readable on a terminal, JSON lines otherwise
    http_listen: str = ""  # host:port for /metrics, /livez and /readyz; "" = off
    hung_seconds: float = Field(default=300.0, gt=0)  # a busy thread silent this long is hung: /livez answers 503
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
    if len(set(folders.values())) != len(folders):
        raise ConfigError(f"bad configuration:\n  {file}: inbox, outbox, archive and failed must be four folders")
    # No folder inside another, either way: an inbox inside the outbox feeds every output back in as a new job, and
    # an outbox inside the inbox does the same. The database and the weights are not the inbox writers' to touch.
    for key, p in folders.items():
        for other, q in folders.items():
            if key != other and q in p.parents:
                raise ConfigError(f"bad configuration:\n  {file}: {key}: {p} must not be inside the {other} {q}")
    db = s.sqlite_path()
    for key, p in (("database", db), ("weights_dir", s.weights_dir)):
        if p is not None and (p == s.inbox or s.inbox in p.resolve().parents):
            raise ConfigError(f"bad configuration:\n  {file}: {key}: {p} must not be inside the inbox {s.inbox}")
