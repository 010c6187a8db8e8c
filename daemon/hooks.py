"""Hooks when a job ends: run a command (an argv list, never a shell) or POST the job as JSON to a URL.

The worker calls :meth:`HookRunner.submit` after the job's commit; it returns at once. Hooks run on the runner's
own threads, each retried with a doubling delay, and every hook's final result is handed to the ``record``
callback the service supplies (``record(job_id, event, ok, detail)``). A hook that fails never fails its job: the
job is already committed when the hook starts.

Secrets stay out of the TOML: ``${NAME}`` in a URL, a header or an argv item is replaced by the environment
variable ``NAME`` when the hook runs (``Authorization = "Bearer ${UPSCALED_HOOK_TOKEN}"``), and the detail that is
recorded and logged shows the text as configured, never the expanded value. A variable that is not set fails that
hook (not retried) with a message that names it.

A command gets the payload as JSON on its standard input, the fields as ``UPSCALED_*`` environment variables, and
``{job_id}``, ``{event}``, ``{input}``, ``{output}``, ``{model}`` and ``{rule}`` replaced in its argv (after the
``${NAME}`` expansion, so a file name can never bring in a variable). The HTTP client is the standard library's
``urllib``: apprise's JSON notifications carry a title and a body, not our payload, and no new dependency is needed
for one POST.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from daemon.logs import get as get_logger

Record = Callable[[int, str, bool, str], None]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FIELDS = ("job_id", "event", "input", "output", "model", "rule")
USER_AGENT = "upscaled-hook/1"
log = get_logger("upscaled.hooks")


class Hook(BaseModel):
    """One action when a job ends: exactly one of ``command`` and ``url``.

    Raises (as pydantic's ValidationError, at load): neither or both of command and url, an empty command, a URL
    that is not http(s), headers without a URL.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] | None = Field(
        default=None,
        description="A program and its arguments (no shell); the "
        "JSON payload comes on its stdin; {job_id}, {input}, {output}, {model}, "
        "{rule} and ${ENV} are filled in.",
    )
    url: str | None = Field(default=None, description="An http(s) URL POSTed the JSON payload.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="HTTP headers for `url` (`${NAME}` from the environment, for tokens)."
    )
    timeout: float = Field(default=10.0, gt=0, le=600, description="Seconds per attempt.")
    retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Attempts after the first (on a 5xx, 408, 429, a network error or a failing command).",
    )
    backoff: float = Field(default=2.0, ge=0, le=3600, description="Seconds before the first retry; doubles each time.")

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0]):
            raise ValueError('must name a program, as a list: command = ["/usr/bin/notify-send", "{input}"]')
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://", v):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_action(self) -> Hook:
        if (self.command is None) == (self.url is None):
            raise ValueError("a hook needs exactly one of command (an argv list) or url")
        if self.headers and self.url is None:
            raise ValueError("headers only apply to a url hook")
        return self

    @property
    def label(self) -> str:
        """The hook as configured (``${NAME}`` not expanded): safe to log and record."""
        return f"POST {self.url}" if self.url is not None else f"command {self.command!r}"


def _as_list(v: Any) -> Any:
    return [] if v is None else [v] if isinstance(v, dict | Hook) else v


class Hooks(BaseModel):
    """The ``on_done`` / ``on_failed`` keys, to mix into ``Rule`` and ``Settings``. Each takes one hook table or a
    list of them."""

    on_done: list[Hook] = Field(
        default_factory=list,
        description="Hooks run after a job is done (and its "
        "metrics recorded): a command (argv list, no shell) or a URL POSTed JSON "
        "(docs/formats.md, Hooks).",
    )
    on_failed: list[Hook] = Field(default_factory=list, description="Hooks run after a job failed.")

    @field_validator("on_done", "on_failed", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _as_list(v)


@dataclass(frozen=True)
class HookEvent:
    """What a hook is told about the job that ended. ``payload()`` is the JSON document it receives."""

    event: Literal["done", "failed"]
    job_id: int
    input: str
    output: str | None = None
    model: str = ""
    rule: str = ""  # the rule's folder
    times: dict[str, float] = field(default_factory=dict)  # stage seconds (t_decode, t_infer, ..., t_total)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the service wants to pass on

    def payload(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra, "schema": 1}


class HookConfigError(ValueError):
    """A hook cannot run as configured (an environment variable it names is not set); not retried."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every ``${NAME}`` replaced by ``env[NAME]``.

    Raises:
        HookConfigError: a named variable is not in ``env``.
    """

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            raise HookConfigError(f"the environment variable {name} is not set (named in {text!r})")
        return env[name]

    return _VAR.sub(sub, text)


def _fill(item: str, event: HookEvent) -> str:
    for name in _FIELDS:
        value = getattr(event, name)
        item = item.replace("{" + name + "}", "" if value is None else str(value))
    return item


@dataclass
class Attempt:
    ok: bool
    detail: str
    retry: bool  # whether another attempt could help


def run_command(hook: Hook, event: HookEvent, env: Mapping[str, str]) -> Attempt:
    """One attempt at a command hook. Never raises for the command's own failure."""
    assert hook.command is not None
    argv = [_fill(expand(a, env), event) for a in hook.command]
    child_env = dict(env)
    child_env.update(
        {f"UPSCALED_{k.upper()}": "" if getattr(event, k) is None else str(getattr(event, k)) for k in _FIELDS}
    )
    body = json.dumps(event.payload(), ensure_ascii=False).encode()
    try:
        proc = subprocess.run(
            argv, input=body, capture_output=True, timeout=hook.timeout, env=child_env, check=False, close_fds=True
        )
    except FileNotFoundError:
        return Attempt(False, f"{argv[0]!r} was not found", retry=False)
    except PermissionError:
        return Attempt(False, f"{argv[0]!r} is not executable", retry=False)
    except subprocess.TimeoutExpired:
        return Attempt(False, f"timed out after {hook.timeout:g} s (killed)", retry=True)
    if proc.returncode == 0:
        return Attempt(True, "exit 0", retry=False)
    tail = proc.stderr.decode("utf-8", "replace").strip()[-300:]
    return Attempt(False, f"exit {proc.returncode}" + (f": {tail}" if tail else ""), retry=True)


def post_json(hook: Hook, event: HookEvent, env: Mapping[str, str]) -> Attempt:
    """One attempt at a URL hook: POST the payload; 2xx is success, 408/429/5xx and network errors may be retried."""
    assert hook.url is not None
    url = expand(hook.url, env)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    headers.update({k: expand(v, env) for k, v in hook.headers.items()})
    body = json.dumps(event.payload(), ensure_ascii=False).encode()
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=hook.timeout) as resp:  # noqa: S310 (http(s) only: validated)
            return Attempt(True, f"HTTP {resp.status}", retry=False)
    except urllib.error.HTTPError as exc:
        return Attempt(False, f"HTTP {exc.code} {exc.reason}", retry=exc.code in (408, 425, 429) or exc.code >= 500)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Attempt(False, f"no answer: {reason}", retry=True)


@dataclass
class _Job:
    hook: Hook
    event: HookEvent
    name: str  # "on_done" or "on_failed"


class HookRunner:
    """Runs hooks on ``workers`` threads of its own; :meth:`submit` never blocks.

    ``record(job_id, event, ok, detail)`` is called once per hook with its final result (``event`` is
    ``"on_done"`` or ``"on_failed"``); ``env`` is where ``${NAME}`` is looked up (default: ``os.environ`` at run
    time). At most ``max_pending`` hooks wait; past that a new one is recorded as failed instead of queued, so a
    dead webhook cannot grow the service's memory.
    """

    def __init__(
        self, record: Record, *, workers: int = 2, env: Mapping[str, str] | None = None, max_pending: int = 1000
    ) -> None:
        self._record = record
        self._env = env
        self._queue: queue.Queue[_Job | None] = queue.Queue(max_pending)
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"upscaled-hook-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, hooks: Sequence[Hook], event: HookEvent) -> None:
        """Queue ``hooks`` for ``event`` and return at once (call it after the job's commit)."""
        name = "on_done" if event.event == "done" else "on_failed"
        for hook in hooks:
            if self._closing.is_set():
                self._safe_record(event.job_id, name, False, f"{hook.label}: not run, the service is stopping")
                continue
            try:
                self._queue.put_nowait(_Job(hook, event, name))
            except queue.Full:
                self._safe_record(
                    event.job_id, name, False, f"{hook.label}: not run, {self._queue.maxsize} hooks are already waiting"
                )

    def close(self, timeout: float = 10.0) -> bool:
        """Run what is queued for up to ``timeout`` seconds, then stop (retry waits end at once). Returns whether
        every thread finished."""
        self._closing.set()
        deadline = time.monotonic() + timeout
        for _ in self._threads:
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                break
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()  # anything still retrying gives up at its next wait
        return not any(t.is_alive() for t in self._threads)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                ok, detail = self._run(job)
            except Exception as exc:  # a bug here must not kill the thread
                ok, detail = False, f"{job.hook.label}: internal error: {exc!r}"
            self._safe_record(job.event.job_id, job.name, ok, detail)

    def _run(self, job: _Job) -> tuple[bool, str]:
        hook = job.hook
        act = run_command if hook.command is not None else post_json
        delay = hook.backoff
        attempts = 0
        while True:
            attempts += 1
            env = os.environ if self._env is None else self._env
            try:
                result = act(hook, job.event, env)
            except HookConfigError as exc:
                return False, f"{hook.label}: {exc}"
            plural = "s" if attempts > 1 else ""
            if result.ok:
                return True, f"{hook.label}: {result.detail} after {attempts} attempt{plural}"
            if not result.retry or attempts > hook.retries:
                log.warning(
                    "hook failed", job_id=job.event.job_id, hook=hook.label, detail=result.detail, attempts=attempts
                )
                return False, f"{hook.label}: {result.detail} after {attempts} attempt{plural}"
            if self._stop.wait(delay):
                return False, f"{hook.label}: {result.detail}; retries stopped, the service is stopping"
            delay *= 2

    def _safe_record(self, job_id: int, event: str, ok: bool, detail: str) -> None:
        try:
            self._record(job_id, event, ok, detail)
        except Exception as exc:  # the service's callback failing must not take the hook thread down
            log.error("recording a hook result failed", job_id=job_id, hook_event=event, error=repr(exc))
