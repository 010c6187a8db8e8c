"""Output sizes: "make it 3840 wide" instead of "x4" (a rule's target size), as pure functions.

A rule says either a factor (``outscale``) or a target (``width``, ``height``, ``max_side`` with ``fit``). The model
always runs at its native scale, as many passes as the target needs (``max_passes`` at most), and one final resize
reaches the exact size: Lanczos when enlarging, area when reducing, as ``outscale`` always has::

    input 100x80 --x4 model--> 400x320 --x4 model--> 1600x1280 --Lanczos--> 3840x3072   (width = 3840)
                  `-------- passes = 2 (x16 <= x38.4) ---------'  `- final resize x2.4 -'

``fit``:

- ``inside`` (default): the largest size that fits inside every bound given (``width``, ``height``, ``max_side``),
  aspect kept. One bound is enough.
- ``cover``: the smallest size that covers ``width`` x ``height``, aspect kept, then the middle is cropped to exactly
  that size.
- ``exact``: exactly ``width`` x ``height``; the aspect changes if it must.

The worker calls :func:`plan` per image, and :func:`check_rule` once per rule at start; :func:`apply_final` does the
final resize and crop on the model's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Self

import numpy as np
from pydantic import BaseModel, Field, model_validator

MAX_SIDE = 1 << 20  # a bound far above any encoder's, so that a typo (an extra zero or three) is a config error
Fit = Literal["inside", "cover", "exact"]


class TargetSize(BaseModel):
    """The rule keys of a target size, to mix into ``Rule`` (``class Rule(TargetSize, ...)``).

    They are exclusive with ``outscale`` (checked when the class it is mixed into has that field).

    Raises (as pydantic's ValidationError, at load):
        ``fit = "cover"`` or ``"exact"`` without both ``width`` and ``height``; ``max_side`` with them; ``fit``
        without any size; any of them together with ``outscale``.
    """

    width: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SIDE,
        description="A target output width in pixels (instead of a factor; exclusive with outscale).",
    )
    height: int | None = Field(default=None, ge=1, le=MAX_SIDE, description="A target output height in pixels.")
    max_side: int | None = Field(
        default=None, ge=1, le=MAX_SIDE, description="A target for the longer side, in pixels."
    )
    fit: Fit = Field(
        default="inside",
        description="With width and height: `inside` fits in the box, aspect kept; "
        "`cover` fills it and crops the middle; `exact` stretches to it.",
    )
    max_passes: int = Field(
        default=2,
        ge=1,
        le=4,
        description="Native model passes at most (x16 from a x4 model is two); beyond them the final resize enlarges.",
    )

    @model_validator(mode="after")
    def _target(self) -> Self:
        given = [k for k in ("width", "height", "max_side") if getattr(self, k) is not None]
        outscale = getattr(self, "outscale", None)
        if given and outscale is not None:
            raise ValueError(
                f"{', '.join(given)} and outscale are exclusive: give a target size or a factor, "
                f"not both (got outscale = {outscale})"
            )
        if self.fit in ("cover", "exact"):
            if self.width is None or self.height is None:
                raise ValueError(
                    f'fit = "{self.fit}" needs both width and height, got width = {self.width}, height = {self.height}'
                )
            if self.max_side is not None:
                raise ValueError(f'max_side only works with fit = "inside", got fit = "{self.fit}"')
        # (fit = "inside" with no size is the default, as a rule written back to JSON holds it: nothing to check)
        return self

    @property
    def has_target(self) -> bool:
        return self.width is not None or self.height is not None or self.max_side is not None


@dataclass(frozen=True)
class SizePlan:
    """How one input reaches its output size."""

    source: tuple[int, int]  # input (w, h)
    passes: int  # native model passes (>= 1)
    model_size: tuple[int, int]  # (w, h) after the passes
    scaled: tuple[int, int]  # (w, h) after the final resize
    output: tuple[int, int]  # (w, h) written: scaled, cropped for fit = "cover"
    crop: tuple[int, int, int, int] | None  # (x, y, w, h) taken from `scaled` (cover), else None
    filter: Literal["lanczos", "area", "none"]  # the final resize
    notes: list[str] = field(default_factory=list)

    @property
    def factor(self) -> float:
        """The overall enlargement of the larger axis (output over input)."""
        return max(self.scaled[0] / self.source[0], self.scaled[1] / self.source[1])


def target_size(source: tuple[int, int], target: TargetSize) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(scaled size, crop size or None) for ``source`` = (w, h) under ``target``. Pure, exact integer sizes.

    ``inside``: the bounding side gets its bound exactly, the other is rounded (never above its own bound, never
    below 1). ``cover``: scaled covers the box, and the crop is the box. ``exact``: the box.

    Raises:
        ValueError: an empty source or a target with no size.
    """
    w, h = source
    if w < 1 or h < 1:
        raise ValueError(f"expected a source of at least 1x1 pixels, got {w}x{h}")
    if not target.has_target:
        raise ValueError("the target has no width, height or max_side")
    if target.fit == "exact":
        return (target.width, target.height), None  # type: ignore[return-value]
    if target.fit == "cover":
        bw, bh = target.width, target.height
        assert bw is not None and bh is not None
        s = max(bw / w, bh / h)
        return (max(bw, round(w * s)), max(bh, round(h * s))), (bw, bh)
    bounds = []  # (scale, which side is exact, its value)
    if target.width is not None:
        bounds.append((target.width / w, "w", target.width))
    if target.height is not None:
        bounds.append((target.height / h, "h", target.height))
    if target.max_side is not None:
        bounds.append((target.max_side / max(w, h), "w" if w >= h else "h", target.max_side))
    s, side, value = min(bounds)
    if side == "w":
        out = (value, max(1, round(h * s)))
    else:
        out = (max(1, round(w * s)), value)
    # Rounding may push the free side a pixel over its own bound: clamp it back.
    cap_w = min([b for b in (target.width, target.max_side) if b is not None], default=out[0])
    cap_h = min([b for b in (target.height, target.max_side) if b is not None], default=out[1])
    return (min(out[0], cap_w), min(out[1], cap_h)), None


def passes_for(factor: float, native_scale: float, max_passes: int = 2) -> int:
    """The native passes for an enlargement of ``factor``: the fewest whose product reaches it, at least 1 and at
    most ``max_passes`` (the final resize does the rest). A small tolerance keeps x16 with a x4 model at 2.

    Raises:
        ValueError: a native scale below 1 or a factor that is not positive.
    """
    if native_scale < 1:
        raise ValueError(f"expected a native scale of at least 1, got {native_scale}")
    if factor <= 0:
        raise ValueError(f"expected a positive factor, got {factor}")
    if factor <= native_scale or native_scale == 1:
        return 1
    needed = math.ceil(math.log(factor) / math.log(native_scale) - 1e-9)
    return max(1, min(needed, max_passes))


def final_filter(size: tuple[int, int], to: tuple[int, int]) -> Literal["lanczos", "area", "none"]:
    """Lanczos when the final resize enlarges (by area), area when it reduces, none when the size is already right
    (the same choice as ``models.resize.finish_resize``)."""
    if tuple(size) == tuple(to):
        return "none"
    return "lanczos" if to[0] * to[1] > size[0] * size[1] else "area"


def plan(
    source: tuple[int, int],
    native_scale: float,
    *,
    target: TargetSize | None = None,
    outscale: float | None = None,
    max_passes: int | None = None,
) -> SizePlan:
    """The passes, the final resize and the crop that take ``source`` = (w, h) to the rule's output size.

    With neither ``target`` nor ``outscale`` the output is one native pass. ``max_passes`` overrides the target's.

    Raises:
        ValueError: a bad source, native scale or outscale, or both a target size and an outscale.
    """
    w, h = source
    if target is not None and target.has_target and outscale is not None:
        raise ValueError("a target size and outscale are exclusive")
    limit = max_passes if max_passes is not None else (target.max_passes if target is not None else 2)
    crop_size = None
    if target is not None and target.has_target:
        scaled, crop_size = target_size(source, target)
    elif outscale is not None:
        if outscale <= 0:
            raise ValueError(f"expected a positive outscale, got {outscale}")
        scaled = (max(1, round(w * outscale)), max(1, round(h * outscale)))
    else:
        scaled = (max(1, round(w * native_scale)), max(1, round(h * native_scale)))
    factor = max(scaled[0] / w, scaled[1] / h)
    passes = passes_for(factor, native_scale, limit)
    model_size = (round(w * native_scale**passes), round(h * native_scale**passes))
    notes = []
    needed = passes_for(factor, native_scale, 64)
    if needed > passes:
        rest = factor / native_scale**passes
        notes.append(
            f"x{factor:.3g} needs {needed} passes of the x{native_scale:g} model; max_passes is {limit}, "
            f"so the last x{rest:.3g} is a Lanczos resize"
        )
    crop = None
    output = scaled
    if crop_size is not None:
        crop = ((scaled[0] - crop_size[0]) // 2, (scaled[1] - crop_size[1]) // 2, crop_size[0], crop_size[1])
        output = crop_size
    return SizePlan(
        source=(w, h),
        passes=passes,
        model_size=model_size,
        scaled=scaled,
        output=output,
        crop=crop,
        filter=final_filter(model_size, scaled),
        notes=notes,
    )


@dataclass(frozen=True)
class RuleCheck:
    """What :func:`check_rule` found for one rule at start."""

    ok: bool
    passes: int | None  # the passes every image needs (a factor rule), None when it depends on the input's size
    message: str  # for the log (and the error when not ok)


def check_rule(
    native_scale: float,
    *,
    target: TargetSize | None = None,
    outscale: float | None = None,
    chainable: bool = True,
    model: str = "the model",
) -> RuleCheck:
    """Say at start whether a rule's size can be reached the way it asks.

    A model that cannot take its own output (``chainable`` False: a diffusion model with a fixed input size, a
    model with an input-size requirement its output breaks) runs one pass only; a rule that would need more is
    refused, so that it is not quietly served by a Lanczos enlargement. A factor rule needs the same passes for
    every image; a target-size rule needs more for smaller inputs, and the worker plans each image.
    """
    limit = target.max_passes if target is not None else 2
    if not chainable:
        limit = 1
    if target is not None and target.has_target:
        if chainable:
            return RuleCheck(
                True,
                None,
                f"{model} (x{native_scale:g}) runs up to {limit} passes per image to reach "
                "the target size; a final resize does the rest",
            )
        return RuleCheck(
            True,
            None,
            f"{model} (x{native_scale:g}) runs one pass per image; it cannot take its "
            "own output, so a final Lanczos resize reaches larger targets",
        )
    factor = outscale if outscale is not None else native_scale
    needed = passes_for(factor, native_scale, 64)
    if needed > 1 and not chainable:
        return RuleCheck(
            False,
            None,
            f"outscale {factor:g} needs {needed} passes of the x{native_scale:g} "
            f"{model}, which cannot take its own output; use outscale <= "
            f"{native_scale:g}, or a model with a larger scale",
        )
    passes = min(needed, limit)
    msg = f"x{factor:g} with {model} (x{native_scale:g}): {passes} pass{'es' if passes > 1 else ''}"
    if needed > passes:
        msg += f" (of {needed} needed; max_passes is {limit}, a final Lanczos resize does the rest)"
    return RuleCheck(True, passes, msg)


_CV2 = {"lanczos": "INTER_LANCZOS4", "area": "INTER_AREA"}  # cv2's flags, by name: cv2 is imported where it resizes


def apply_final(img: np.ndarray, p: SizePlan) -> np.ndarray:
    """The model's output (at ``p.model_size``) resized to ``p.scaled`` with ``p.filter``, then cropped for
    ``cover``. Works on uint8, uint16 and float32 (H, W, C) or (H, W) arrays; OpenCV saturates integer results, and
    floats are clipped to [0, 1] since Lanczos overshoots.

    Raises:
        ValueError: ``img`` is not the plan's model size.
    """
    if (img.shape[1], img.shape[0]) != p.model_size:
        raise ValueError(
            f"expected the model's output at {p.model_size[0]}x{p.model_size[1]}, got {img.shape[1]}x{img.shape[0]}"
        )
    out = img
    if p.filter != "none":
        import cv2  # here, not at the top: the configuration imports this module, and `upscaled history` with it

        out = cv2.resize(img, p.scaled, interpolation=getattr(cv2, _CV2[p.filter]))
        if img.ndim == 3 and out.ndim == 2:  # OpenCV drops a trailing channel axis of length 1
            out = out[:, :, None]
        if np.issubdtype(out.dtype, np.floating):
            np.clip(out, 0.0, 1.0, out=out)
    if p.crop is not None:
        x, y, cw, ch = p.crop
        out = np.ascontiguousarray(out[y : y + ch, x : x + cw])
    return out
