"""The configuration reference is generated from the fields themselves: every key has a description and a row."""

from __future__ import annotations

import tomllib

import pytest

from daemon import configdoc
from daemon.config import Rule, Settings
from daemon.hooks import Hook
from models.backends import BACKENDS
from tests.conftest import ROOT

DOC = (ROOT / "docs" / "configuration.md").read_text()


def test_the_reference_in_docs_is_what_the_code_generates():
    assert configdoc.render(DOC) == DOC, "docs/configuration.md is out of date: run python -m daemon.configdoc"


@pytest.mark.parametrize(
    "model", [Settings, Rule, Hook, *(b.params for b in BACKENDS if b.params.model_fields)], ids=lambda m: m.__name__
)
def test_every_key_has_a_description_and_a_row(model):
    for name, field in model.model_fields.items():
        if name in configdoc.HIDDEN:
            continue
        assert field.description and len(field.description) > 10, f"{model.__name__}.{name} has no description"
        assert f"| `{name}` |" in DOC, f"docs/configuration.md has no row for {model.__name__}.{name}"


def test_every_key_of_the_shipped_file_is_a_documented_key():
    shipped = tomllib.loads((ROOT / "settings.toml").read_text())
    for key in shipped:
        assert key in Settings.model_fields and f"| `{key}` |" in DOC, key
    for rule in shipped["rules"]:
        for key in rule:
            assert key in Rule.model_fields and f"| `{key}` |" in DOC, key


def test_a_missing_section_is_an_error_not_a_silent_pass():
    with pytest.raises(ValueError, match="generated: rule"):
        configdoc.render(DOC.replace("<!-- generated: rule -->", "<!-- nothing -->"))
