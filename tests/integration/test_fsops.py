"""Reading through a folder's handle with a limit: never more bytes than the caller accepts (issue 20, finding 5's
read side: a 10 MB input grown to 1.5 GB after it was registered was read whole by the worker)."""

from __future__ import annotations

import os
import pickle

import pytest

from daemon.errors import FileTooLongError
from daemon.fsops import Root, read_at_most


def test_a_file_over_the_limit_is_refused_before_a_byte_is_read(tmp_path):
    (tmp_path / "in.png").write_bytes(b"p" * 1000)
    with Root(tmp_path, create=False) as root:
        assert root.read_bytes("in.png", limit=1000) == b"p" * 1000
        assert root.read_bytes("in.png") == b"p" * 1000
        with pytest.raises(FileTooLongError, match=r"in\.png holds 1000 bytes, over the 999 bytes it may have") as exc:
            root.read_bytes("in.png", limit=999)
        with pytest.raises(FileTooLongError):
            root.open_file("in.png", limit=999)
    assert (exc.value.limit, exc.value.size, exc.value.kind) == (999, 1000, "too-large")
    again = pickle.loads(pickle.dumps(exc.value))  # it may cross from a child process
    assert (type(again), str(again), again.size) == (FileTooLongError, str(exc.value), 1000)


def test_a_file_grown_while_held_open_is_read_no_further_than_its_limit(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(b"p" * 1000)
    with Root(tmp_path, create=False) as root:
        fd, st = root.open_file("in.png", limit=1000)  # registered at 1000 bytes
    try:
        assert st.st_size == 1000
        with open(path, "ab") as fh:  # the writer goes on after the open
            fh.truncate(64 << 20)
        with pytest.raises(FileTooLongError, match="grew while it was read") as exc:
            read_at_most(fd, 1000, "in.png")
        assert exc.value.size is None
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1001, "read past the limit + 1 byte that tells it is longer"
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.raises(FileTooLongError):
            read_at_most(fd, 64 << 20 - 1, "in.png")
        os.lseek(fd, 0, os.SEEK_SET)
        assert len(read_at_most(fd, 64 << 20, "in.png")) == 64 << 20  # within the limit: every byte
    finally:
        os.close(fd)
