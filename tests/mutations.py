"""The mutation guard: break each invariant on purpose, one line at a time, and check that a test notices.

``make test-mutations`` runs this. For every mutation of ``tests/mutations.toml`` it

1. copies the tree (the files git tracks, plus new ones it does not ignore) into a temporary folder: never a git
   worktree, never the checkout itself;
2. replaces the mutation's ``find`` snippet, which must occur exactly once in its file (a refactor that moves or
   changes the code fails the guard loudly, before anything runs, so the mutation has to move with the code);
3. runs only the tests listed beside it there, ``-x`` (the first failure is the catch), with ``PYTHONPATH`` at the
   copy, no bytecode written (a stale ``.pyc`` must never stand in for the mutated source) and pytest's temporary
   folders under the mutation's own folder;
4. counts it caught if one of them failed; survived if they all passed; and an error if they skipped, timed out or
   did not run (a skipped test proves nothing).

First, unless ``--no-baseline``, the same tests run once on the unmutated copy: they must all pass, or a "catch"
would mean nothing. (``.ci/run`` passes ``--no-baseline`` because ``make test`` has just run them.)

Mutations are independent (each has its own copy of the tree, its own temporary folders, and tests that pick free
ports), so ``--jobs`` of them run at once, one pytest process each: by default twice the CPUs this process may use
(a run waits as much as it computes). The baseline is split the same way, by test file. A mutation marked
``alone = true`` (its tests time the service: watchdog pings that must keep coming) runs after the others with
nothing beside it, and so do its tests in the baseline. A progress line is printed as each one ends; the table at
the end is in the list's order whatever the order they ended in.

It prints a table (mutation, tests run, caught?, the test that caught it, seconds) and exits 1 if any mutation
survived, 2 if the guard itself could not do its job (an anchor gone, a failing baseline, a skip or a timeout).

Usage::

    python tests/mutations.py                      # everything
    python tests/mutations.py --list               # the mutations and their invariants
    python tests/mutations.py --only window-on-fail --only backoff-not-capped --no-baseline
    python tests/mutations.py --jobs 1                 # one at a time
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = Path(__file__).with_name("mutations.toml")
KEYS = {"name", "invariant", "file", "find", "replace", "tests"}
OPTIONAL = {"alone"}  # alone = true: its tests time the service (watchdog gaps), so nothing else runs beside them


class GuardError(Exception):
    """The guard cannot do its job: a bad list, an anchor that is gone, a failing baseline."""


@dataclass(frozen=True)
class Mutation:
    """One named break of one invariant: ``find`` in ``file`` becomes ``replace``; ``tests`` must catch it."""

    name: str
    invariant: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    alone: bool = False  # run with nothing beside it: its tests measure time (see OPTIONAL)

    def apply(self, tree: Path) -> None:
        """Mutate ``file`` under ``tree`` in place.

        Raises:
            GuardError: the snippet is not there exactly once.
        """
        path = tree / self.file
        text = path.read_text()
        n = text.count(self.find)
        if n != 1:
            raise GuardError(
                f"{self.name}: {self.file} holds {n} copies of its snippet, expected exactly 1: {self.find!r}"
            )
        path.write_text(text.replace(self.find, self.replace))


@dataclass
class Outcome:
    """What the tests did under one mutation (or on the baseline)."""

    name: str
    status: str  # caught, SURVIVED, error
    ran: int = 0
    listed: int = 0
    by: str = ""  # the test that failed first, or why it is an error
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)
    detail: str = field(default="", repr=False)


def load(path: Path = LIST) -> list[Mutation]:
    """The mutations of ``path``, checked for shape (not yet against the code).

    Raises:
        GuardError: an unknown or missing key, a duplicate name, a multi-line snippet, a no-op, no tests.
    """
    data = tomllib.loads(path.read_text())
    out: list[Mutation] = []
    for i, item in enumerate(data.get("mutation", [])):
        where = f"{path.name}: mutation {i + 1} ({item.get('name', '?')})"
        if not KEYS <= set(item) <= KEYS | OPTIONAL:
            raise GuardError(f"{where}: keys {sorted(item)}, expected {sorted(KEYS)}, optionally {sorted(OPTIONAL)}")
        if not isinstance(item.get("alone", False), bool):
            raise GuardError(f"{where}: alone must be true or false, got {item['alone']!r}")
        m = Mutation(
            item["name"],
            item["invariant"],
            item["file"],
            item["find"],
            item["replace"],
            tuple(item["tests"]),
            item.get("alone", False),
        )
        if "\n" in m.find or "\n" in m.replace:
            raise GuardError(f"{where}: a mutation is one line; its snippets may not span lines")
        if m.find == m.replace or not m.find:
            raise GuardError(f"{where}: find and replace must differ and find may not be empty")
        if not m.tests:
            raise GuardError(f"{where}: no tests to catch it")
        if any(o.name == m.name for o in out):
            raise GuardError(f"{where}: the name {m.name!r} is used twice")
        out.append(m)
    if not out:
        raise GuardError(f"{path}: no [[mutation]] entries")
    return out


def check_anchors(mutations: Iterable[Mutation], tree: Path = ROOT) -> list[str]:
    """Every problem with the snippets against the code of ``tree``: a missing file, a snippet found 0 or 2+ times."""
    problems = []
    for m in mutations:
        path = tree / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        n = path.read_text().count(m.find)
        if n != 1:
            problems.append(
                f"{m.name}: {m.file} holds {n} copies of {m.find!r} (expected exactly 1: move the "
                "mutation with the code it breaks)"
            )
    return problems


def tree_files(root: Path = ROOT) -> list[str]:
    """The files of the tree as git sees them: tracked ones, and new ones that are not ignored."""
    try:
        res = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise GuardError(
            f"cannot list the files of {root} with git (the guard copies what git tracks): {exc}"
        ) from None
    names = [n for n in res.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
    return sorted({n for n in names if (root / n).is_file() or (root / n).is_symlink()})


def copy_tree(files: Sequence[str], dest: Path, root: Path = ROOT) -> None:
    """Copy ``files`` (relative to ``root``) into ``dest``, links as links."""
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)


def child_env(tree: Path) -> dict[str, str]:
    """The environment of a test run in ``tree``: its code first on the path, no bytecode written, the shared
    weights and datasets where the checkout has them, and skips reported (not failed: see :func:`run_tests`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["UPSCALED_SHARED"] = os.environ.get("UPSCALED_SHARED", str(ROOT.parent / "shared"))
    env.pop("UPSCALED_REQUIRE_ALL", None)  # a skip must not pass for a catch: it is reported as an error instead
    return env


def run_tests(
    tree: Path, tests: Sequence[str], name: str, timeout: float, stop_first: bool = True, scratch: Path | None = None
) -> Outcome:
    """Run ``tests`` in ``tree`` and say what happened (``caught`` when one failed). ``scratch`` (a folder beside
    ``tree``, its own) holds pytest's temporary folders and the JUnit report, so that runs side by side share
    nothing."""
    scratch = scratch or tree.with_name(tree.name + "-scratch")
    scratch.mkdir(parents=True, exist_ok=True)
    junit = scratch / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "--junitxml",
        str(junit),
        "--rootdir",
        str(tree),
        "--basetemp",
        str(scratch / "tmp"),
        *(["-x"] if stop_first else []),
        *tests,
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=tree,
        env=child_env(tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a timeout, or Ctrl-C: the run is in a session of its own and would go on
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and the daemons it started
        out, _ = proc.communicate()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
        return Outcome(
            name,
            "error",
            listed=len(tests),
            by=f"timed out after {timeout:.0f} s",
            seconds=time.monotonic() - t0,
            detail=out,
        )
    seconds = time.monotonic() - t0
    ran, failed, skipped = _junit(junit)
    outcome = Outcome(name, "", ran=ran, listed=len(tests), seconds=seconds, detail=out, failed=failed)
    if proc.returncode == 1 and failed:
        outcome.status, outcome.by = "caught", failed[0]
    elif proc.returncode == 0 and not skipped:
        outcome.status = "SURVIVED"
    elif proc.returncode == 0:
        outcome.status, outcome.by = "error", f"skipped: {', '.join(skipped)}"
    else:  # 2: interrupted (a collection error), 3: internal error, 4: usage (an unknown test id), 5: no tests
        outcome.status, outcome.by = "error", f"pytest exited {proc.returncode}"
    return outcome


def _junit(path: Path) -> tuple[int, list[str], list[str]]:
    """(tests run, the failed or errored ones in order, the skipped ones) from pytest's JUnit XML."""
    if not path.exists():
        return 0, [], []
    ran, failed, skipped = 0, [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        ran += 1
        test = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(test)
        elif case.find("skipped") is not None:
            skipped.append(test)
    return ran, failed, skipped


def table(outcomes: Sequence[Outcome]) -> str:
    """The report: one row per mutation."""
    head = ("mutation", "tests run", "caught?", "by", "seconds")
    body = [(o.name, f"{o.ran}/{o.listed}", o.status, o.by, f"{o.seconds:.1f}") for o in outcomes]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(mutations: Sequence[Mutation], outcomes: Sequence[Outcome]) -> str:
    """The run as docs/reliability.md lists it: how many mutations each module has, then every mutation by module
    (file), with its invariant, the test that caught it and the seconds its run took."""
    by_name = {o.name: o for o in outcomes}
    files = sorted({m.file for m in mutations})
    lines = ["| module | mutations | caught |", "| --- | ---: | ---: |"]
    for f in files:
        ms = [m for m in mutations if m.file == f]
        caught = sum(1 for m in ms if m.name in by_name and by_name[m.name].status == "caught")
        lines.append(f"| `{f}` | {len(ms)} | {caught} |")
    lines.append(f"| **all** | **{len(mutations)}** | **{sum(o.status == 'caught' for o in outcomes)}** |")
    lines += ["", "| module | mutation | the invariant it breaks | caught by | s |", "| --- | --- | --- | --- | ---: |"]
    for f in files:
        for m in (m for m in mutations if m.file == f):
            o = by_name.get(m.name)
            by = o.by if o is not None and o.status == "caught" else (o.status if o is not None else "not run")
            secs = f"{o.seconds:.1f}" if o is not None else ""
            lines.append(f"| `{f}` | {m.name} | {m.invariant.replace('|', '/')} | `{by}` | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutation (repeat)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the unmutated run (when the same tests have just passed, as in .ci/run)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300)")
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=default_jobs(),
        help=f"mutations run at once (default: the CPUs this process may use, here {default_jobs()})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary trees (their path is printed)")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also write the run as docs/reliability.md lists it (counts per module, every mutation by module)",
    )
    parser.add_argument(
        "--every",
        action="store_true",
        help="run every listed test (no -x) and count a mutation caught only if each one failed: "
        "checks the list itself, slower",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        mutations = load()
        unknown = sorted(set(args.only) - {m.name for m in mutations})
        if unknown:
            raise GuardError(f"--only: no mutation named {unknown}")
        if args.list:
            for m in mutations:
                print(f"{m.name}\n    {m.invariant}\n    {m.file}: {m.find!r} -> {m.replace!r}")
                print("".join(f"    catches: {t}\n" for t in m.tests), end="")
            return 0
        problems = check_anchors(mutations)  # all of them, even with --only: a stale list fails at once
        if problems:
            raise GuardError("the code moved under these mutations:\n  " + "\n  ".join(problems))
        chosen = [m for m in mutations if not args.only or m.name in args.only]
        return _run(chosen, args)
    except GuardError as exc:
        print(f"mutation guard: {exc}", file=sys.stderr)
        return 2


def default_jobs() -> int:
    """Twice the CPUs this process may run on (its affinity). A mutation's run waits as much as it computes (for a
    daemon to start, a file to settle, a server to answer): with 2 runs on 2 cores the guard used half a core on
    average, and 4 at a time took 631 s where 2 took 802 s (docs/reliability.md)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 * max(1, cpus)


def split_by_file(tests: Sequence[str], parts: int) -> list[list[str]]:
    """``tests`` in at most ``parts`` groups of whole test files (a module's fixtures are then set up once), the
    files dealt largest first to the group with the fewest tests so far; each group keeps the list's order."""
    files: dict[str, list[str]] = {}
    for t in tests:
        files.setdefault(t.split("::", 1)[0], []).append(t)
    groups: list[list[str]] = [[] for _ in range(max(1, min(parts, len(files))))]
    for ids in sorted(files.values(), key=len, reverse=True):
        min(groups, key=len).extend(ids)
    order = {t: i for i, t in enumerate(tests)}
    return [sorted(g, key=order.__getitem__) for g in groups if g]


def _baseline(mutations: Sequence[Mutation], files: Sequence[str], tmp: Path, args: argparse.Namespace) -> None:
    """Every listed test on the unmutated tree, in ``--jobs`` groups side by side; all must pass, none skip.

    Raises:
        GuardError: a test failed, skipped or timed out.
    """
    timed = list(dict.fromkeys(t for m in mutations if m.alone for t in m.tests))
    tests = [t for t in dict.fromkeys(t for m in mutations for t in m.tests) if t not in timed]
    groups = split_by_file(tests, args.jobs) if tests else []
    print(
        f"baseline: {len(tests) + len(timed)} tests on the unmutated tree, in {len(groups)} group(s) side by side"
        + (f", then {len(timed)} alone" if timed else "")
        + " ...",
        flush=True,
    )
    t0 = time.monotonic()

    def one(i: int, group: list[str]) -> Outcome:
        tree = tmp / f"baseline-{i}"
        copy_tree(files, tree)
        return run_tests(tree, group, "baseline", args.timeout * 2, stop_first=False)

    outcomes = []
    if groups:
        with ThreadPoolExecutor(len(groups)) as pool:
            outcomes = list(pool.map(one, range(len(groups)), groups))
    if timed and all(o.status == "SURVIVED" for o in outcomes):
        outcomes.append(one(len(groups), timed))
    bad = [o for o in outcomes if o.status != "SURVIVED"]  # SURVIVED: everything passed and nothing skipped
    if bad:
        print(bad[0].detail[-6000:], file=sys.stderr)
        raise GuardError(
            f"the tests fail or skip on the unmutated tree ({bad[0].status}: {bad[0].by}); a mutation caught by "
            "them would prove nothing"
        )
    print(f"baseline: {sum(o.ran for o in outcomes)} passed in {time.monotonic() - t0:.0f} s", flush=True)


def _run(mutations: Sequence[Mutation], args: argparse.Namespace) -> int:
    started = time.monotonic()
    files = tree_files()
    tmp = Path(tempfile.mkdtemp(prefix="upscaled-mutations-"))
    outcomes: list[Outcome | None] = [None] * len(mutations)
    printing = threading.Lock()
    finished = 0

    def one(i: int, m: Mutation) -> None:
        nonlocal finished
        tree = tmp / f"{i + 1:02d}"
        copy_tree(files, tree)
        m.apply(tree)
        o = run_tests(tree, m.tests, m.name, args.timeout, stop_first=not args.every)
        if args.every and o.status == "caught" and len(o.failed) < len(m.tests):
            o.status, o.by = "SURVIVED", f"only {len(o.failed)} of {len(m.tests)} listed tests failed"
        outcomes[i] = o
        with printing:
            finished += 1
            print(f"[{finished}/{len(mutations)}] {m.name}: {o.status} {o.by} ({o.seconds:.1f} s)", flush=True)
            if o.status == "error":
                print(o.detail[-4000:], file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(tree, ignore_errors=True)
            shutil.rmtree(tree.with_name(tree.name + "-scratch"), ignore_errors=True)

    try:
        if not args.no_baseline:
            _baseline(mutations, files, tmp, args)
        side_by_side = [(i, m) for i, m in enumerate(mutations) if not m.alone]
        if side_by_side:
            with ThreadPoolExecutor(min(args.jobs, len(side_by_side))) as pool:
                futures = [pool.submit(one, i, m) for i, m in side_by_side]
                try:
                    for future in futures:
                        future.result()  # a GuardError (or a bug) in one of them ends the run here
                except BaseException:
                    for future in futures:
                        future.cancel()  # the ones not started; those running end on their own
                    raise
        for i, m in enumerate(mutations):  # then the ones that time the service, one at a time with nothing beside
            if m.alone:
                one(i, m)
    finally:
        if args.keep:
            print(f"trees kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    done = [o for o in outcomes if o is not None]
    print()
    print(table(done))
    survived = [o.name for o in done if o.status == "SURVIVED"]
    errors = [o.name for o in done if o.status == "error"]
    caught = len(done) - len(survived) - len(errors)
    print(
        f"\n{caught}/{len(done)} caught in {time.monotonic() - started:.0f} s with {args.jobs} at a time"
        + (f"; SURVIVED: {', '.join(survived)}" if survived else "")
        + (f"; errors: {', '.join(errors)}" if errors else "")
    )
    if args.markdown is not None:
        args.markdown.write_text(markdown(mutations, done))
        print(f"the table by module is in {args.markdown}")
    return 2 if errors else 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
