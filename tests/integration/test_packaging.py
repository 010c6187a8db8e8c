"""What `pip install` and `make` do with this tree (issue 22): a wheel that holds every package and every data file,
built without setuptools' warnings, and a Makefile that reuses an up-to-date venv.

The full round trip (wheel, sdist and `pipx install` into fresh venvs outside the checkout, each running a real job,
and the README followed in a `git clone`) is `.ci/package-check`, which needs the network's packages and minutes;
these are the seconds-long checks of the same promises.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from tests.conftest import ROOT

# Files a package needs at run time that are not Python: the migrations' Alembic files, the web view's pages.
DATA = [
    "daemon/migrations/alembic.ini",
    "daemon/migrations/script.py.mako",
    "daemon/web/templates/base.html",
    "daemon/web/templates/job.html",
    "daemon/web/static/style.css",
    "daemon/web/static/compare.js",
    "daemon/web/static/favicon.svg",
]


def _source_copy(dest: Path) -> Path:
    """The files a build reads, copied: a build in the checkout would leave build/ and *.egg-info there."""
    for name in ("pyproject.toml", "README.md", "constraints.txt", "Makefile"):
        shutil.copy2(ROOT / name, dest / name)
    for pkg in ("daemon", "models", "bench"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_the_wheel_holds_every_package_and_data_file_without_warnings(tmp_path):
    (tmp_path / "src").mkdir()
    src = _source_copy(tmp_path / "src")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Package would be ignored" not in res.stdout + res.stderr  # setuptools' 93 lines, once per data folder
    (wheel,) = (tmp_path / "dist").glob("upscaled-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {
        str(p.parent.relative_to(ROOT))
        for pkg in ("daemon", "models", "bench")
        for p in (ROOT / pkg).rglob("__init__.py")
    }
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages left out of the wheel: {missing}"
    assert "daemon/media/formats.py" in names  # the one a hand-written list forgot
    assert not [d for d in DATA if d not in names], [d for d in DATA if d not in names]
    assert not [n for n in names if n.startswith("tests/")]


def _make(cwd: Path, *args: str) -> str:
    res = subprocess.run(
        ["make", "--no-print-directory", "-n", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_reuses_a_venv_whose_stamp_is_newer_than_its_inputs(tmp_path):
    """`make -n` says what make would run: the install only when pyproject.toml or constraints.txt is newer than the
    venv's stamp. The venv here is a folder with an interpreter link; make only looks at the files' times."""
    src = _source_copy(tmp_path)
    venv = src / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    old = time.time() - 100
    for name in ("pyproject.toml", "constraints.txt"):
        os.utime(src / name, (old, old))
    assert "pip install" in _make(src, "install")  # no stamp yet
    (venv / ".installed-run").touch()
    (venv / ".installed-test").touch()
    for target in ("run", "test-fast", "install", "install-test"):
        assert "pip install" not in _make(src, target), target
    assert "upscaled run" in _make(src, "run")
    (src / "constraints.txt").touch()  # a new pin: both installs are due again
    assert "pip install --quiet -c constraints.txt -e '.[all]'" in _make(src, "run")
    assert "pip install --quiet -c constraints.txt -e '.[all,test]'" in _make(src, "test-fast")
    assert "pip install --quiet -c constraints.txt -e '.'" in _make(src, "install", "EXTRAS=")  # the core alone
    # `make test` stays the README's test command, the format check included.
    test = _make(src, "test")
    assert "ruff format --check bench daemon models tests benchmarks" in test and "-m pytest -q" in test


def test_make_run_hands_the_weights_mirror_to_the_service(tmp_path):
    """`make run` fetches from the mirror and gives it to check-config and the service as their weights_mirror, so
    the hints they print name it."""
    src = _source_copy(tmp_path)
    (src / ".venv" / "bin").mkdir(parents=True)
    (src / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (src / ".venv" / ".installed-run").touch()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    out = _make(src, "run", f"WEIGHTS_MIRROR={mirror}")
    assert f"weights fetch fsrcnn ditn-real-x4 brisque --mirror {mirror}" in out
    assert f"UPSCALED_WEIGHTS_MIRROR={mirror} .venv/bin/upscaled check-config" in out
    assert f"UPSCALED_WEIGHTS_MIRROR={mirror} .venv/bin/upscaled run" in out
