"""Animated GIF, WebP and APNG: frames stream on decode, and durations, loop and disposal survive the encode.

Outputs are read back with OpenCV's animation reader (``cv2.imreadanimation``), not with Pillow, which wrote them;
Pillow is used only for what OpenCV does not report (the GIF disposal field).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from daemon.errors import DecodeError, ImageTooLargeError, OutputError
from daemon.imageio import Frame, encode_animation
from daemon.media.decode import decode_bytes, probe

W, H = 40, 30
DURATIONS = [100, 200, 300]


def frames_rgb(n: int, alpha: bool = False) -> list[np.ndarray]:
    """``n`` clearly different frames: a bar that moves, on a colour that changes (and a transparent corner)."""
    out = []
    for i in range(n):
        a = np.zeros((H, W, 4 if alpha else 3), np.uint8)
        a[..., 0], a[..., 1], a[..., 2] = 40 + 60 * (i % 3), 90, 200 - 50 * (i % 4)
        a[:, (i * 7) % W : (i * 7) % W + 5, :3] = 255
        if alpha:
            a[..., 3] = 255
            a[:8, :8, 3] = 0
        out.append(a)
    return out


def make(
    fmt: str,
    n: int = 3,
    durations: list[int] | None = None,
    loop: int | None = 0,
    alpha: bool = False,
    disposal: int | list[int] = 1,
) -> bytes:
    ims = [Image.fromarray(a) for a in frames_rgb(n, alpha)]
    buf = io.BytesIO()
    params: dict = {"save_all": True, "append_images": ims[1:], "duration": durations or DURATIONS[:n]}
    if loop is not None:
        params["loop"] = loop
    if fmt == "GIF":
        params["disposal"] = disposal
    if fmt == "WEBP":
        params["lossless"] = True
    ims[0].save(buf, fmt, **params)
    return buf.getvalue()


def x2(frame: Frame) -> Frame:
    """The stand-in for a model: x2 nearest neighbour, the frame's timing untouched."""
    up = np.repeat(np.repeat(frame.pixels, 2, axis=0), 2, axis=1)
    return Frame(up, frame.duration_ms, frame.disposal, frame.blend)


def read_with_opencv(data: bytes, fmt: str, tmp_path: Path) -> tuple[list[np.ndarray], list[int], int]:
    path = tmp_path / f"out.{fmt}"
    path.write_bytes(data)
    ok, anim = cv2.imreadanimation(str(path))
    assert ok, f"OpenCV cannot read the animated {fmt}"
    return list(anim.frames), [int(d) for d in anim.durations], int(anim.loop_count)


@pytest.mark.parametrize(("pil", "fmt"), [("GIF", "gif"), ("WEBP", "webp"), ("PNG", "png")])
def test_three_frames_come_out_x2_with_their_durations(pil, fmt, tmp_path):
    d = decode_bytes(make(pil), 10**8)
    assert (d.frames, d.format, d.loop, d.width, d.height) == (3, fmt, 0, W, H)
    rest = d.rest()
    assert iter(rest) is rest  # a lazy iterator, not a list
    frames = [d.first, *rest]
    assert [f.duration_ms for f in frames] == DURATIONS
    for got, want in zip(frames, frames_rgb(3), strict=True):  # composed whole frames, decoded exactly
        np.testing.assert_array_equal(got.pixels[:, :, :3], want)
    # quality 100: WebP lossless, so that every writer can be held to exact pixels
    data, notes = encode_animation((x2(f) for f in frames), fmt, loop=d.loop, meta=d.meta, quality=100)
    assert notes == []
    cv_frames, durations, loop = read_with_opencv(data, fmt, tmp_path)
    assert len(cv_frames) == 3 and durations == DURATIONS and loop == 0
    for got, want in zip(cv_frames, frames_rgb(3), strict=True):
        assert got.shape[:2] == (2 * H, 2 * W)
        want2 = np.repeat(np.repeat(want, 2, axis=0), 2, axis=1)
        rgb = cv2.cvtColor(got[:, :, :3], cv2.COLOR_BGR2RGB)
        # GIF quantises to a palette; these frames have few colours, so every writer keeps them exactly.
        np.testing.assert_array_equal(rgb, want2)


def test_gif_loop_count_and_play_once_are_kept():
    d = decode_bytes(make("GIF", loop=3), 10**8)
    assert d.loop == 3
    data, _ = encode_animation([x2(d.first), *map(x2, d.rest())], "gif", loop=d.loop)
    netscape = data.index(b"NETSCAPE2.0")  # the loop block: sub-block 1, then the 16-bit little-endian count
    assert data[netscape + 11 : netscape + 16] == b"\x03\x01\x03\x00\x00"
    once = decode_bytes(make("GIF", loop=None), 10**8)
    assert once.loop is None
    data, _ = encode_animation([once.first, *once.rest()], "gif", loop=once.loop)
    assert "loop" not in Image.open(io.BytesIO(data)).info  # no NETSCAPE block: played once


def test_gif_disposal_and_transparency_are_kept():
    src = make("GIF", alpha=True, disposal=[2, 1, 2])
    d = decode_bytes(src, 10**8)
    frames = [d.first, *d.rest()]
    assert d.has_alpha and [f.disposal for f in frames] == [2, 1, 2]
    data, _ = encode_animation(map(x2, frames), "gif", loop=0)
    im = Image.open(io.BytesIO(data))
    got = []
    for i in range(im.n_frames):
        im.seek(i)
        got.append(im.disposal_method)
        rgba = np.asarray(im.convert("RGBA"))
        assert (rgba[:16, :16, 3] == 0).all() and (rgba[20:, 20:, 3] == 255).all()  # the corner stays clear
    assert got == [2, 1, 2]


def test_apng_blend_is_source_so_semi_transparent_pixels_do_not_build_up(tmp_path):
    frames = [
        Frame(np.dstack([np.full((4, 4, 3), 200 - 50 * i, np.uint8), np.full((4, 4), 128, np.uint8)]), duration_ms=50)
        for i in range(3)
    ]
    data, _ = encode_animation(frames, "png", loop=0)
    back = decode_bytes(data, 10**6)
    for got in [back.first, *back.rest()]:
        assert (got.pixels[:, :, 3] == 128).all()  # OP_OVER over the previous frame would give 192


def test_frames_stream_one_at_a_time():
    """rest() decodes frame k only when asked: a frame damaged past frame 2 fails there, not at decode."""
    d = decode_bytes(make("PNG", n=5, durations=[10] * 5), 10**8)
    it = d.rest()
    assert next(it).duration_ms == 10  # frame 2
    source = d._source
    assert source is not None and source.im.tell() == 1  # the decoder is on frame 2, nothing read ahead


def test_max_frames_and_max_pixels_count_every_frame():
    data = make("GIF", n=30, durations=[20] * 30)
    with pytest.raises(ImageTooLargeError, match="30 frames, over the max_frames limit of 20"):
        decode_bytes(data, 10**8, max_frames=20)
    with pytest.raises(ImageTooLargeError, match="all frames count"):
        decode_bytes(data, W * H * 29)
    p = probe(io.BytesIO(data), 10**8)
    assert (p.format, p.frames, p.animated) == ("gif", 30, True)


def test_a_truncated_animation_is_a_decode_error():
    data = make("GIF", n=5, durations=[20] * 5)
    with pytest.raises(DecodeError):
        d = decode_bytes(data[: len(data) - 200], 10**8)
        list(d.rest())


def test_encode_animation_refuses_what_it_cannot_write():
    f = Frame(np.zeros((4, 4, 3), np.uint8), 10)
    with pytest.raises(OutputError, match="jpg output cannot hold an animation"):
        encode_animation([f], "jpg")
    with pytest.raises(OutputError, match="at least one frame"):
        encode_animation([], "gif")
    with pytest.raises(OutputError, match="same size"):
        encode_animation([f, Frame(np.zeros((5, 4, 3), np.uint8), 10)], "webp")
    with pytest.raises(OutputError, match="16383"):
        encode_animation([Frame(np.zeros((1, 16384, 3), np.uint8))], "webp")


def test_16bit_frames_are_reduced_with_a_note(tmp_path):
    f = Frame(np.full((4, 4, 3), 65535, np.uint16), 40)
    data, notes = encode_animation([f, Frame(np.zeros((4, 4, 3), np.uint16), 40)], "webp", loop=0)
    assert any("8 bits" in n for n in notes)
    frames, durations, _ = read_with_opencv(data, "webp", tmp_path)
    assert len(frames) == 2 and frames[0].max() == 255 and durations == [40, 40]
