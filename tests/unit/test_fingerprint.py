"""The rule fingerprint is part of every job's key: pinned here, and every ``Rule`` field must say where it stands.

A job is unique on (content sha256, rule fingerprint). A change to what goes into the fingerprint changes it for
every rule, and every finished file would be processed again after an upgrade. So the values are pinned, and a new
``Rule`` field fails here until it is classified: in the fingerprint from the start (only the keys below), in
``_LATER_KEYS`` (changes the pixels; left out while at its default, so existing rules keep their fingerprint), or in
``_NOT_OUTPUT`` (never changes a pixel written).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import _LATER_KEYS, _NOT_OUTPUT, Rule

# The keys the first fingerprints were made of (``params`` flat, as its keys were rule keys before). Adding a key
# here changes every fingerprint: a new field goes in _LATER_KEYS or _NOT_OUTPUT instead.
FINGERPRINTED = (
    "model",
    "scale",
    "outscale",
    "mode",
    "format",
    "quality",
    "naming",
    "metrics",
    "downscale",
    "alpha",
    "tile",
    "compare",
    "params",
)


def test_every_rule_field_is_classified_once():
    fields = set(Rule.model_fields)
    groups = {"the fingerprint": set(FINGERPRINTED), "_LATER_KEYS": set(_LATER_KEYS), "_NOT_OUTPUT": set(_NOT_OUTPUT)}
    unclassified = fields - set().union(*groups.values())
    assert not unclassified, (
        f"Rule fields {sorted(unclassified)} are not classified: add each to _LATER_KEYS in daemon/config.py if it "
        "changes the pixels written (left out of the fingerprint at its default, so finished jobs stay finished), "
        "or to _NOT_OUTPUT if it never does"
    )
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b], f"{sorted(groups[a] & groups[b])} are in both {a} and {b}"
    gone = set().union(*groups.values()) - fields
    assert not gone, f"{sorted(gone)} are classified but are not Rule fields"


# Pinned values: one changed means every job of such rules would run again after an upgrade.
GOLDEN = [
    ("the default rule", {}, "5c38cf0cbfc6a410"),
    ("model, scale, format, quality", dict(model="nearest", scale=3, format="jpg", quality=80), "36b36bf657dc8867"),
    ("a later key away from its default", dict(width=640), "b213e4540862f94c"),
    ("metadata, a later key, away from its default", dict(metadata="strip"), "0517bceb43c56844"),
    ("benchmark mode with its metrics", dict(mode="benchmark", scale=4, metrics=["psnr_y"]), "742942f83e3b97e3"),
]


@pytest.mark.parametrize(("what", "keys", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_fingerprints(what: str, keys: dict, expected: str):
    assert Rule(**keys).fingerprint() == expected, f"the fingerprint of {what} changed"


def test_what_never_changes_a_pixel_is_left_out_and_later_keys_only_count_when_used():
    base = Rule().fingerprint()
    same = Rule(folder="x", device="cpu", compression=9, precision="fp32", on_done=[{"url": "http://127.0.0.1/"}])
    assert same.fingerprint() == base
    assert Rule(width=None, metadata="keep", max_passes=Rule().max_passes).fingerprint() == base
    for keys in (dict(scale=3), dict(format="png"), dict(quality=90), dict(alpha="model"), dict(max_side=512)):
        assert Rule(**keys).fingerprint() != base, keys


def test_a_backends_params_are_in_it_flat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A diffusion rule's generation options, in a [rules.params] table or at the rule's top level as before: one
    fingerprint, pinned (the pipeline folder is named relative to the working folder, so the id is fixed)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionUpscalePipeline"}')
    base = Rule(model="diffusers:pipe", scale=4)
    assert base.fingerprint() == "d61d0d95ceedc258"
    seeded = Rule(model="diffusers:pipe", scale=4, params={"seed": 1})
    assert seeded.fingerprint() == Rule(model="diffusers:pipe", scale=4, seed=1).fingerprint() != base.fingerprint()
