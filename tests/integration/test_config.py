"""Configuration: the shipped file, env overrides, and errors that name the key and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import Rule, load_settings
from daemon.errors import ConfigError
from tests.conftest import ROOT, write_config


def test_shipped_settings_load_and_resolve_relative_to_the_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the repo: relative paths must follow the file, not the cwd
    s = load_settings(ROOT / "settings.toml", check_paths=False)
    assert s.inbox == ROOT / "inbox"
    assert s.database == f"sqlite:///{ROOT / 'var' / 'upscaled.db'}"
    folders = {r.folder for r in s.all_rules()}
    assert "" in folders and "photos" in folders
    assert s.rule_for("photos/2024/summer").folder == "photos"
    assert s.rule_for("unknown/place").folder == ""


def test_env_overrides_a_key_and_config_names_the_file(monkeypatch, tmp_path):
    cfg = write_config(tmp_path)
    monkeypatch.setenv("UPSCALED_CONFIG", str(cfg))
    monkeypatch.setenv("UPSCALED_SETTLE_SECONDS", "4.5")
    monkeypatch.setenv("UPSCALED_DEVICE", "cuda:1")
    s = load_settings()
    assert s.settle_seconds == 4.5 and s.device == "cuda:1"
    assert s.config_file == cfg


def test_default_rule_is_added_when_missing(tmp_path):
    s = load_settings(write_config(tmp_path, rules=[{"folder": "a", "model": "bicubic", "scale": 3}]))
    assert s.rule_for("").folder == "" and s.rule_for("a/b").scale == 3


@pytest.mark.parametrize(
    ("rules", "keys", "needle"),
    [
        ([], {"colour": "red"}, "colour: unknown key"),
        ([{"folder": "x", "model": "nosuch"}], {}, "rules[0].model"),
        ([{"folder": "x", "model": "nosuch"}], {}, "unknown model 'nosuch'"),
        ([{"folder": "x", "model": "fsrcnn", "scale": 8}], {}, "fsrcnn cannot upscale x8; it has x2, x3, x4"),
        ([{"folder": "x", "model": "lapsrn", "scale": 3}], {}, "lapsrn cannot upscale x3"),
        (
            [{"folder": "x", "model": "sd-x4-upscaler", "scale": 4, "outscale": 16}],
            {},
            "outscale 16 needs 2 passes of the x4 sd-x4-upscaler, which cannot take its own output",
        ),
        ([{"folder": "x", "model": "bicubic", "typo": 1}], {}, "rules[0].typo: unknown key"),
        ([{"folder": "../up", "model": "bicubic"}], {}, "rules[0].folder"),
        ([{"folder": "x", "model": "bicubic", "naming": "{stem}/../../x.{ext}"}], {}, "rules[0].naming"),
        ([{"folder": "x", "model": "bicubic", "naming": "{nope}.{ext}"}], {}, "unknown field"),
        ([{"folder": "x", "model": "bicubic", "mode": "benchmark", "scale": 2, "outscale": 3}], {}, "benchmark"),
        ([{"folder": "x", "model": "bicubic", "metrics": ["psnr_y"]}], {}, "not available in upscale mode"),
        ([], {"device": "gpu"}, "device: must be auto, cpu, cuda or cuda:N"),
        ([{"folder": "a"}, {"folder": "a"}], {}, "two rules for folder 'a'"),
    ],
)
def test_bad_configuration_names_key_and_file(tmp_path, rules, keys, needle):
    cfg = write_config(tmp_path, rules=rules, **keys)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert needle in str(err.value)
    assert str(cfg) in str(err.value)


def test_bad_paths_are_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="inbox: .* exists and is not a folder"):
        load_settings(write_config(tmp_path, inbox="afile"))
    with pytest.raises(ConfigError, match="outbox: .* must not be inside the inbox"):
        load_settings(write_config(tmp_path, outbox="inbox/out"))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("inbox = [unclosed\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(bad)


def test_env_value_errors_say_so(monkeypatch, tmp_path):
    cfg = write_config(tmp_path)
    monkeypatch.setenv("UPSCALED_SETTLE_SECONDS", "soon")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "$UPSCALED_SETTLE_SECONDS" in str(err.value) and "settle_seconds" in str(err.value)


def test_fingerprint_changes_with_output_affecting_fields_only():
    a = Rule(folder="a", model="bicubic", scale=2)
    assert a.fingerprint() == Rule(folder="b", model="bicubic", scale=2, device="cpu").fingerprint()
    assert a.fingerprint() != Rule(folder="a", model="bicubic", scale=3).fingerprint()
    assert a.fingerprint() != Rule(folder="a", model="bicubic", scale=2, format="jpg").fingerprint()


# Each key that changes the pixels or the file written, with a rule before and after changing it.
PIXEL_KEYS = {
    "scale": ({}, {"scale": 3}),
    "outscale": ({}, {"outscale": 3}),
    "width": ({}, {"width": 640}),
    "height": ({}, {"height": 480}),
    "max_side": ({}, {"max_side": 1000}),
    "fit": ({"width": 640, "height": 480}, {"width": 640, "height": 480, "fit": "cover"}),
    "max_passes": ({"width": 640}, {"width": 640, "max_passes": 3}),
    "format": ({}, {"format": "jpg"}),
    "quality": ({}, {"quality": 80}),
    "metadata": ({}, {"metadata": "strip"}),
    "alpha": ({}, {"alpha": "model"}),
    "naming": ({}, {"naming": "{stem}.{ext}"}),
    "mode": ({}, {"mode": "benchmark"}),
}


@pytest.mark.parametrize("key", list(PIXEL_KEYS))
def test_every_key_that_changes_what_is_written_changes_the_fingerprint(key):
    """Issue 21, row 4: a fingerprint that left out the target size made a file redone under a new ``width`` a
    "duplicate" of the old job, never redone; the break was caught only by a 60 s timeout, not by a message."""
    before, after = PIXEL_KEYS[key]
    base = {"folder": "a", "model": "bicubic", "scale": 2}
    a, b = Rule(**{**base, **before}), Rule(**{**base, **after})
    assert a.fingerprint() != b.fingerprint(), (
        f"{key} changes what is written, so it must change the rule's fingerprint: else a file dropped again "
        f"after {after} is a duplicate of its job under {before or 'the defaults'} and is never redone"
    )
    for same in ({"folder": "b"}, {"device": "cpu"}, {"precision": "fp32"}, {"compression": 9}):
        assert Rule(**{**base, **after, **same}).fingerprint() == b.fingerprint(), (
            f"{same} does not change the pixels, so it must not change the fingerprint"
        )


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=60
    )


def test_check_config_command_and_run_refuse_a_bad_file(tmp_path):
    good = write_config(tmp_path)
    ok = _cli("--config", str(good), "check-config", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "(default): bicubic x2" in ok.stdout
    bad = write_config(tmp_path, rules=[{"folder": "p", "model": "espcn", "scale": 8}])
    for cmd in (["check-config"], ["run"]):
        res = _cli("--config", str(bad), *cmd, cwd=tmp_path)
        assert res.returncode != 0
        assert "rules[0].scale" in res.stderr and str(bad) in res.stderr and "espcn cannot upscale x8" in res.stderr
    assert not (tmp_path / "inbox").exists(), "a bad configuration must stop start-up before anything is made"


def test_workers_auto_is_one_per_usable_core_on_the_cpu_at_most_4_and_one_per_gpu(tmp_path):
    """``workers = "auto"`` (the default): on a CPU-only node one inference thread per CPU this process may use,
    at most 4; on a GPU one. Measured in a child pinned to one and to every CPU (its affinity is what counts)."""
    import os

    cfg = write_config(tmp_path)
    code = (
        "import os, sys; os.sched_setaffinity(0, set(list(os.sched_getaffinity(0))[:int(sys.argv[1])])); "
        "from daemon.config import load_settings; s = load_settings(sys.argv[2]); "
        "print(s.workers, s.worker_count(), s.cpu_workers())"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, whatever this machine has
    mine = len(os.sched_getaffinity(0))
    for cpus in sorted({1, mine}):
        out = subprocess.run(
            [sys.executable, "-c", code, str(cpus), str(cfg)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=True,
        ).stdout.split()
        assert out == ["auto", str(min(4, cpus)), str(min(4, cpus))], (cpus, out)
    s = load_settings(write_config(tmp_path, workers=3, device=["cpu", "cuda:0"]))
    assert s.worker_count() == 3 and s.cpu_workers() == 3  # cuda:0's three do not share the CPU's cores
    s = load_settings(write_config(tmp_path, device="cuda:0"))
    assert s.worker_count() == 1 and s.cpu_workers() == 0
