"""A throw-away PostgreSQL server: ``initdb`` into a temp folder, ``pg_ctl start`` on 127.0.0.1. Standard library only.

The tests start one through :func:`running_server` (see tests/postgres.py). ``.ci/run`` starts one for the whole
run before the venv exists:

    python3 tests/pgserver.py COMMAND [ARG...]

runs COMMAND with ``$UPSCALED_TEST_POSTGRES`` set to the server's base URL, stops the server afterwards, and exits
with COMMAND's status. Without server binaries, or with ``$UPSCALED_TEST_POSTGRES`` already set, it just runs
COMMAND. The binaries are looked up on PATH and in /usr/lib/postgresql/*/bin. initdb refuses to run as root, so as
root the server runs as ``nobody``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoServer(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


@contextmanager
def running_server(options: str = "") -> Iterator[str]:
    """Start a throw-away PostgreSQL server; yields its base URL (no database name) and stops it afterwards.
    ``options``: more ``-c name=value`` server settings, after (so over) the defaults here.

    Raises:
        NoServer: initdb or pg_ctl cannot be found.
        subprocess.CalledProcessError: initdb or the start failed (the server log is in the message).
    """
    bindir = _bindir()
    if bindir is None:
        raise NoServer("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    root = Path(tempfile.mkdtemp(prefix="upscaled-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        os.chown(root, 65534, 65534)
        prefix = (
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            if shutil.which("setpriv")
            else ["runuser", "-u", "nobody", "--"]
        )
    data, port = root / "data", _free_port()
    run = dict(check=True, capture_output=True, text=True, cwd=root)
    try:
        try:
            subprocess.run(
                [
                    *prefix,
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                **run,
            )
            # fsync off: a test server need not survive a power cut, and the 2-core CI box is shared.
            opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 {options}"
            subprocess.run(
                [
                    *prefix,
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    opts,
                    "-l",
                    str(root / "log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                **run,
            )
        except subprocess.CalledProcessError as exc:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            exc.stderr = f"{exc.stderr}\n{log}"
            raise
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                cwd=root,
            )
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    if not argv:
        sys.exit("usage: python3 tests/pgserver.py COMMAND [ARG...]")
    if os.environ.get("UPSCALED_TEST_POSTGRES"):
        return subprocess.call(argv)
    try:
        with running_server() as url:
            version = subprocess.run([str(_bindir() / "pg_ctl"), "--version"], capture_output=True, text=True)
            print(f"{version.stdout.strip()} for the tests at {url}", flush=True)
            return subprocess.call(argv, env=dict(os.environ, UPSCALED_TEST_POSTGRES=url))
    except NoServer as exc:
        print(f"no PostgreSQL server for the tests: {exc}", flush=True)
        return subprocess.call(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
