"""The prompt sidecar of daemon/intake.py: read through the inbox's directory handle, never through a link.

These run without torch or diffusers (a diffusion rule is only parsed here, never loaded), so the guard against a
``photo.png.prompt.txt`` that is a link to a secret holds on every machine, not only where the diffusion backend's
packages are installed. The text is read in the real sandbox, as the service reads it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from daemon.config import Rule
from daemon.errors import BadSidecarError
from daemon.fsops import Root
from daemon.intake import read_prompt, with_sidecar_prompt
from tests.conftest import shared_sandbox

DIFFUSION = Rule(model="sd-x4-upscaler", scale=4, params={"prompt": "from the rule"})


@pytest.fixture
def inbox(tmp_path: Path):
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "photo.png").write_bytes(b"not read here")
    root = Root(tmp_path / "inbox")
    yield root
    root.close()


def test_a_sidecar_replaces_the_prompt_of_a_rule_that_takes_one(inbox):
    img, sandbox = PurePosixPath("photo.png"), shared_sandbox()
    assert with_sidecar_prompt(DIFFUSION, inbox, img, sandbox) is DIFFUSION  # no sidecar: the rule's own prompt
    (inbox.path / "photo.png.prompt.txt").write_text("\ufeff  a red barn\n", encoding="utf-8")
    assert with_sidecar_prompt(DIFFUSION, inbox, img, sandbox).params["prompt"] == "a red barn"
    bicubic = Rule(model="bicubic")
    assert with_sidecar_prompt(bicubic, inbox, img, sandbox) is bicubic  # a backend without a prompt never reads it


def test_a_sidecar_that_is_a_link_to_a_secret_is_refused_and_never_read(inbox, tmp_path):
    """Issue 21: the only guard against this was in test_diffusion.py, which skips without torch; a symlinked
    ``photo.png.prompt.txt`` was read into the prompt when ``O_NOFOLLOW`` was removed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the database password")
    (inbox.path / "photo.png.prompt.txt").symlink_to(secret)
    with pytest.raises(BadSidecarError) as err:
        read_prompt(inbox, PurePosixPath("photo.png"), shared_sandbox())
    assert "photo.png.prompt.txt" in str(err.value) and "symbolic link" in str(err.value), str(err.value)
    assert "password" not in str(err.value)
    with pytest.raises(BadSidecarError):
        with_sidecar_prompt(DIFFUSION, inbox, PurePosixPath("photo.png"), shared_sandbox())


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"\xff\xfe bad", "is not UTF-8 text"), (b"x" * 5000, "is over 4096 bytes; a prompt is a line of text")],
)
def test_a_sidecar_that_is_not_a_short_utf8_text_fails_its_job_with_why(inbox, content, match):
    (inbox.path / "photo.png.prompt.txt").write_bytes(content)
    with pytest.raises(BadSidecarError, match=match):
        read_prompt(inbox, PurePosixPath("photo.png"), shared_sandbox())


def test_a_name_too_long_for_a_sidecar_has_none(inbox):
    assert (
        read_prompt(inbox, PurePosixPath("n" * 251 + ".png"), shared_sandbox()) is None
    )  # 255 bytes: name + .prompt.txt cannot exist


def test_a_file_over_max_file_bytes_is_refused_before_its_header_is_read(tmp_path):
    """The size comes first: 2 KiB of what is not an image, against a 1 KiB limit, is "too large", not "not an
    image" (which it would be, had its header been read), and a real image under the limit passes."""
    from daemon.config import load_settings
    from daemon.errors import ImageTooLargeError
    from daemon.intake import inspect
    from tests.conftest import image, write_config

    settings = load_settings(write_config(tmp_path, max_file_bytes=1024))
    settings.inbox.mkdir(parents=True, exist_ok=True)
    (settings.inbox / "big.png").write_bytes(b"\0" * 2048)
    image(settings.inbox / "small.png", (8, 8))
    with Root(settings.inbox) as root:
        with pytest.raises(ImageTooLargeError, match="is 2048 bytes, over the max_file_bytes limit of 1024"):
            inspect(root, PurePosixPath("big.png"), settings, shared_sandbox())
        sha, probe, st = inspect(root, PurePosixPath("small.png"), settings, shared_sandbox())
    assert (probe.width, probe.height) == (8, 8) and st.st_size <= 1024 and len(sha) == 64
