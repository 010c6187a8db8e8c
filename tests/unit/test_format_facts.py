"""Every list of formats a user meets comes from daemon/media/formats.FORMATS: the rule's ``format`` choices, the
CLI's ``--output-format``, the lossy outputs that are measured after decoding, the animations upscaled frame by
frame."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from daemon import imageio, pipeline
from daemon.cli import main
from daemon.config import Rule
from daemon.media.formats import FORMATS


def test_the_cli_offers_every_output_format():
    res = CliRunner().invoke(main, ["process", "--help"], terminal_width=400)
    assert res.exit_code == 0, res.output
    offered = res.output.split("--output-format [", 1)[1].split("]", 1)[0].split("|")
    assert offered == list(FORMATS), f"--output-format offers {offered}, the encoders write {list(FORMATS)}"


def test_a_rule_takes_every_output_format_and_names_them_when_refusing_one():
    assert [Rule(format=name).format for name in FORMATS] == list(FORMATS)
    with pytest.raises(ValidationError, match="'png', 'jpg', 'webp', 'tiff', 'avif', 'heic', 'jxl' or 'gif'"):
        Rule(format="bmp")


def test_lossy_and_animated_follow_what_each_format_can_hold():
    assert set(pipeline.LOSSY) == {"jpg", "webp", "avif", "heic", "jxl"}
    assert set(imageio.ANIMATED_FORMATS) == {"png", "webp", "gif"}
    assert all(FORMATS[f].lossy for f in pipeline.LOSSY) and all(FORMATS[f].animated for f in imageio.ANIMATED_FORMATS)
