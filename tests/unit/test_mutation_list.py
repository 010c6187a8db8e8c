"""The mutation guard's list itself (tests/mutations.toml): its shape, its reach, and its page in the docs.

Invariant 7 of the design: every promise in docs/ has a named break and a test that catches it. The guard
(``make test-mutations``) checks that each break is caught; this checks, in the unit layer, that the list reaches
every module of daemon/ and models/ (a new module without a mutation fails here, naming it) and that
docs/reliability.md lists every mutation by name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _guard():
    spec = importlib.util.spec_from_file_location("mutations", ROOT / "tests" / "mutations.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutations", module)
    spec.loader.exec_module(module)
    return module


def modules() -> list[str]:
    """Every module of daemon/ and models/ with code: package markers (``__init__.py``) and the Alembic revisions'
    scaffolding hold none of their own."""
    found = []
    for pkg in ("daemon", "models"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py" and rel != "daemon/migrations/__init__.py":
                continue
            if rel == "daemon/migrations/env.py" or ("/versions/" in rel and not rel.endswith("0001_initial.py")):
                continue
            found.append(rel)
    return found


def test_the_list_loads_with_unique_names_one_line_snippets_and_tests():
    mutations = _guard().load()
    assert len(mutations) >= 60, f"the guard holds {len(mutations)} mutations; issue 21 asks for at least 60"
    assert all(t.startswith("tests/") and "::" in t for m in mutations for t in m.tests)


def test_every_module_of_daemon_and_models_has_a_mutation():
    covered = {m.file for m in _guard().load()}
    missing = [m for m in modules() if m not in covered]
    assert not missing, (
        f"modules with no named break in tests/mutations.toml: {missing}; add a [[mutation]] for a promise each "
        "makes, with the test that catches it (docs/reliability.md, the mutation guard)"
    )


def test_docs_list_every_mutation_by_name():
    text = (ROOT / "docs" / "reliability.md").read_text()
    missing = [m.name for m in _guard().load() if f"| {m.name} |" not in text]
    assert not missing, f"docs/reliability.md does not list {missing} (python tests/mutations.py --markdown FILE)"


def test_every_snippet_occurs_once_in_its_file():
    """A refactor that moves the code under a mutation fails here, in the unit layer, naming the mutation: not at
    the end of CI, where the guard refuses to start."""
    guard = _guard()
    problems = guard.check_anchors(guard.load())
    assert not problems, "move these mutations with the code they break:\n  " + "\n  ".join(problems)


def test_every_listed_test_exists():
    """A renamed test would leave its mutation with nothing to run: each listed test is a function of its file."""
    missing = []
    for m in _guard().load():
        for test in m.tests:
            path, _, name = test.partition("::")
            source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
            if f"def {name.split('[')[0]}(" not in source:
                missing.append(f"{m.name}: {test}")
    assert not missing, "tests listed in tests/mutations.toml that do not exist:\n  " + "\n  ".join(missing)
