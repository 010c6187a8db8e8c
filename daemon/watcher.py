"""Finding complete files in the inbox: watchdog events, a full scan, and the settle rule.

The observer thread only puts events on a queue; the service's loop decides. A file becomes *eligible* after a
close-after-write, a creation or a move into the inbox (with the polling observer, which sees no closes, after any
change), or when a scan finds it; a write makes it ineligible until the next close. An eligible file is *ready*
once its size and mtime have not changed for ``settle_seconds``.
Symlinks are never followed, hidden folders are skipped, and ignored names never become candidates.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import queue
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon import logs
from daemon.fsops import display

log = logs.get("upscaled.watcher")


def ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def scan(root: Path, patterns: list[str]) -> Iterator[Path]:
    """Every non-ignored entry below ``root`` that is not a folder, without entering hidden or linked folders."""
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(files):
            if not ignored(name, patterns):
                yield Path(dirpath) / name


@dataclass
class Candidate:
    path: Path
    eligible: bool
    size: int = -1
    mtime_ns: int = -1
    stable_since: float = 0.0


class _Handler(FileSystemEventHandler):
    def __init__(self, q: queue.Queue, polling: bool) -> None:
        self.q, self.polling = q, polling

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                # A folder moved in (or made) may hold files that produced no events of their own.
                self.q.put(("scan", Path(os.fsdecode(event.dest_path or event.src_path))))
            return
        src = Path(os.fsdecode(event.src_path))
        if isinstance(event, FileMovedEvent):
            self.q.put(("gone", src))
            self.q.put(("ready", Path(os.fsdecode(event.dest_path))))
        elif isinstance(event, (FileClosedEvent, FileCreatedEvent)):
            # inotify reports a file moved in from outside the watched tree as a creation with no close, so a
            # creation is eligible too; a write that follows makes it wait for its close again.
            self.q.put(("ready", src))
        elif isinstance(event, FileModifiedEvent):
            self.q.put(("ready" if self.polling else "writing", src))
        elif isinstance(event, FileDeletedEvent):
            self.q.put(("gone", src))


class Watcher:
    """Tracks candidate files and says which are ready."""

    def __init__(
        self, root: Path, patterns: list[str], settle_seconds: float, polling: bool = False, poll_seconds: float = 2.0
    ) -> None:
        self.root = root
        self.patterns = patterns
        self.settle = settle_seconds
        self.polling = polling
        self.poll_seconds = poll_seconds
        self.events: queue.Queue = queue.Queue()
        self.candidates: dict[Path, Candidate] = {}
        # Files handed on as ready, with the (size, mtime) they had: a rescan skips them while they are unchanged,
        # so a long queue is not hashed again every rescan_seconds.
        self.handed: dict[Path, tuple[int, int]] = {}
        self._observer: BaseObserver | None = None

    # --- observer ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        obs = PollingObserver(timeout=self.poll_seconds) if self.polling else Observer()
        obs.schedule(_Handler(self.events, self.polling), str(self.root), recursive=True)
        obs.daemon = True
        obs.start()
        self._observer = obs

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    @property
    def running(self) -> bool:
        """Whether events still come: the observer thread and its emitter are alive. An emitter ends on an error, or
        when the inbox folder itself is gone (the polling one at its next poll); from then on only the periodic
        rescan would see new files."""
        obs = self._observer
        return obs is not None and obs.is_alive() and all(e.is_alive() for e in obs.emitters)

    # --- candidates ----------------------------------------------------------------------------------------------
    def _wanted(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        return not ignored(path.name, self.patterns) and not any(p.startswith(".") for p in rel.parts[:-1])

    def note(self, path: Path, eligible: bool) -> None:
        if not self._wanted(path):
            return
        self.handed.pop(path, None)  # an event about it: it is new or changed, look again
        cand = self.candidates.get(path)
        if cand is None:
            self.candidates[path] = Candidate(path, eligible)
        elif eligible:
            cand.eligible = True
        else:
            cand.eligible = False  # written again: wait for the next close

    def finished(self, path: Path) -> None:
        """Called from any thread when the job of a handed-on file has ended."""
        self.events.put(("finished", path))

    def forget(self, path: Path) -> None:
        self.candidates.pop(path, None)
        self.handed.pop(path, None)

    def drain(self, timeout: float = 0.0) -> int:
        """Apply queued events; wait up to ``timeout`` for the first. Returns how many were applied."""
        n = 0
        try:
            item = self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
        except queue.Empty:
            return 0
        while True:
            kind, path = item
            if kind == "ready":
                self.note(path, True)
            elif kind == "writing":
                self.note(path, False)
            elif kind == "gone":
                self.forget(path)
            elif kind == "finished":  # its job ended: if the file is still here, the next rescan looks again
                self.handed.pop(path, None)
            elif kind == "scan":
                self.rescan(path)
            n += 1
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return n

    def rescan(self, root: Path | None = None) -> int:
        """Add every file under ``root`` (default: the inbox) that is not yet a candidate. Returns how many."""
        n = 0
        seen: set[Path] = set()
        for path in scan(root or self.root, self.patterns):
            seen.add(path)
            if path in self.candidates or not self._wanted(path):
                continue
            if path in self.handed:
                try:
                    st = os.lstat(path)
                except OSError:  # gone since the walk saw it, or its folder swapped: as ready() says
                    continue
                if self.handed[path] == (st.st_size, st.st_mtime_ns):
                    continue
            self.candidates[path] = Candidate(path, eligible=True)
            n += 1
        if root is None:  # forget what left the inbox
            self.handed = {p: v for p, v in self.handed.items() if p in seen}
        return n

    def ready(self, now: float) -> list[Path]:
        """Candidates whose size and mtime have held for ``settle_seconds``. They are removed from the set.

        Never raises for one path: a candidate that cannot be looked at any more is dropped, alone. It is gone
        (ENOENT), or a folder on its path was swapped for a file (ENOTDIR) or a link loop (ELOOP), or made
        unsearchable (EACCES). The last ones are logged; a rescan finds the file again if it comes back.
        """
        out = []
        for path, cand in list(self.candidates.items()):
            try:
                st = os.lstat(path)
            except OSError as exc:
                del self.candidates[path]
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("watcher.unreachable", file=display(str(path)), error=exc.strerror or str(exc))
                continue
            if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                cand.size, cand.mtime_ns, cand.stable_since = st.st_size, st.st_mtime_ns, now
                if self.settle > 0 or not cand.eligible:
                    continue
            if not cand.eligible:
                continue
            if stat.S_ISDIR(st.st_mode):
                del self.candidates[path]
                continue
            if now - cand.stable_since >= self.settle:
                del self.candidates[path]
                self.handed[path] = (st.st_size, st.st_mtime_ns)
                out.append(path)
        return out

    def next_deadline(self, now: float) -> float | None:
        """Seconds until the earliest eligible candidate could be ready, or None if none waits."""
        waits = [max(0.0, c.stable_since + self.settle - now) for c in self.candidates.values() if c.eligible]
        return min(waits) if waits else None
