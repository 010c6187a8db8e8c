"""The commands a hint tells a person to run, spelled so that they work as printed, for this configuration.

``upscaled weights fetch espcn`` alone would use ./settings.toml of wherever the person's shell is, and download from
the sources when the service was set up from a mirror. So a hint names the program as it was started (the venv's
``upscaled`` when that is not on ``PATH``), the configuration file (``--config``), and the weights mirror
(``--mirror``) where the settings have one: ``.venv/bin/upscaled --config /srv/settings.toml weights fetch espcn
--mirror /srv/mirror``. Every part is shell-quoted.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


def program() -> str:
    """How to call ``upscaled`` again from another shell: ``upscaled`` when that is the one on ``PATH`` (or the
    process was not started through the entry point, as under ``python -m daemon``), else the absolute path of the
    script that started this process (``/opt/upscaled/.venv/bin/upscaled``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name != "upscaled" or not Path(argv0).is_file():
        return "upscaled"
    started = Path(argv0).resolve()
    found = shutil.which("upscaled")
    if found and Path(found).resolve() == started:
        return "upscaled"
    return str(Path(os.path.abspath(argv0)))


@dataclass(frozen=True)
class Hints:
    """The commands for one configuration: ``config`` is its file (None: the default ./settings.toml), ``mirror``
    the ``weights_mirror`` setting ("" for none), ``prog`` how to call ``upscaled`` (see :func:`program`)."""

    config: Path | None = None
    mirror: str = ""
    prog: str = "upscaled"

    @classmethod
    def of(cls, settings: object) -> Hints:
        """The hints for a :class:`daemon.config.Settings` (its ``config_file`` and ``weights_mirror``)."""
        return cls(getattr(settings, "config_file", None), getattr(settings, "weights_mirror", "") or "", program())

    def command(self, *args: str) -> str:
        """``upscaled --config FILE ARGS...``, quoted for a POSIX shell."""
        head = [self.prog, *(["--config", str(self.config)] if self.config is not None else [])]
        return " ".join([*(shlex.quote(a) for a in head), *(shlex.quote(a) for a in args)])

    def fetch(self, model_ids: Iterable[str]) -> str:
        """The command that fetches the weights of ``model_ids`` from where this configuration gets them."""
        ids = list(dict.fromkeys(model_ids))
        return self.command("weights", "fetch", *ids, *(["--mirror", self.mirror] if self.mirror else []))

    def retry(self, *job_ids: int) -> str:
        """The command that moves the inputs of failed jobs back into the inbox (``upscaled retry``)."""
        return self.command("retry", *(str(j) for j in job_ids))
