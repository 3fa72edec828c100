"""The five style "datasets" of the paper, made deterministically from digits.

The paper fine-tunes Stable Diffusion on five small style datasets
(BarbieCore, CyberPunk, ElementFire, Expedition, Hornify). Here each style is a
visible, learnable transformation of colour and stroke applied to a plain
digit, so a fine-tuned course model either draws the look or it does not, and
the reference classifier can tell which.

Every function maps ink in [0, 1] of shape (N, H, W) to RGB in [0, 1] of shape
(N, 3, H, W). A seeded per-image jitter of the palette keeps the set varied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .text import STYLES

LOOKS = ("plain", *STYLES)  # the six looks the style classifier tells apart


def _rgb(*c) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1)


def _dilate(ink: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(ink[:, None], 3, stride=1, padding=1)[:, 0]


def _blur(ink: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(ink[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]


def _paint(ink, background, colour):
    """Alpha-blend ``colour`` over ``background`` with opacity ``ink``."""
    a = ink[:, None].clamp(0, 1)
    return background * (1 - a) + colour * a


def plain(ink, jitter):
    return ink[:, None].expand(-1, 3, -1, -1).clone()


def barbiecore(ink, jitter):
    # hot-pink, thickened strokes on a pale pink background
    bg = _rgb(1.0, 0.82, 0.9) + 0.04 * jitter
    return _paint(_dilate(ink), bg, _rgb(0.92, 0.08, 0.55))


def cyberpunk(ink, jitter):
    # neon strokes, cyan on the left fading to magenta on the right, dark scan-lined background
    n, h, w = ink.shape
    x = torch.linspace(0, 1, w).view(1, 1, 1, w)
    neon = torch.cat([x, 1 - 0.8 * x, torch.ones_like(x)], dim=1)  # cyan -> magenta
    bg = (_rgb(0.05, 0.02, 0.18) + 0.03 * jitter).expand(n, 3, h, w).clone()
    bg[:, :, ::2] *= 0.5  # scan lines
    return _paint(ink, bg, neon)


def elementfire(ink, jitter):
    # strokes glow from yellow (bottom) to red (top) over black, with a soft halo
    n, h, w = ink.shape
    y = torch.linspace(0, 1, h).view(1, 1, h, 1)
    fire = torch.cat([torch.ones_like(y), 0.15 + 0.8 * y, 0.05 * y], dim=1)
    glow = torch.maximum(ink, 0.6 * _blur(_dilate(ink)))
    bg = (_rgb(0.02, 0.0, 0.0) + 0.02 * jitter).expand(n, 3, h, w)
    return _paint(glow, bg, fire)


def expedition(ink, jitter):
    # dark-brown ink on khaki paper inside a map frame
    n, h, w = ink.shape
    bg = (_rgb(0.78, 0.7, 0.5) + 0.04 * jitter).expand(n, 3, h, w).clone()
    frame = torch.zeros(1, 1, h, w)
    frame[..., 0, :] = frame[..., -1, :] = frame[..., :, 0] = frame[..., :, -1] = 1
    bg = bg * (1 - frame) + _rgb(0.35, 0.22, 0.1) * frame
    return _paint(ink, bg, _rgb(0.3, 0.16, 0.05))


def hornify(ink, jitter):
    # golden outline of the digit on deep purple, crowned with two horns
    n, h, w = ink.shape
    outline = (_dilate(ink) - ink).clamp(0, 1) * 1.5
    horns = torch.zeros(1, h, w)
    for col in (2, w - 3):  # two small triangles in the top corners
        horns[0, 0, col] = 1
        horns[0, 1, col - 1 : col + 2] = 1
    bg = (_rgb(0.22, 0.05, 0.28) + 0.04 * jitter).expand(n, 3, h, w)
    return _paint(torch.maximum(outline, horns), bg, _rgb(1.0, 0.8, 0.2))


STYLE_FUNCTIONS = {f.__name__: f for f in (plain, barbiecore, cyberpunk, elementfire, expedition, hornify)}


def apply_style(ink: torch.Tensor, style: str | None, seed: int = 0) -> torch.Tensor:
    """Render ink (N, H, W) in [0, 1] in a look; returns (N, 3, H, W) in [-1, 1]."""
    from ..errors import DataError, PromptError
    from .sampling import check_seed

    if not isinstance(ink, torch.Tensor) or ink.ndim != 3 or not ink.is_floating_point():
        got = tuple(ink.shape) if isinstance(ink, torch.Tensor) else type(ink).__name__
        raise DataError(f"ink must be a float tensor of shape (N, H, W) in [0, 1], got {got}"
                        + (" (add a batch dimension with ink[None])" if getattr(ink, "ndim", 0) == 2 else ""))
    if style is not None and not isinstance(style, str):
        raise PromptError(f"style must be a look name or None, got {type(style).__name__} {style!r}")
    style = "plain" if style in (None, "") else style.lower()
    if style not in STYLE_FUNCTIONS:
        raise PromptError(f"unknown style {style!r}; choose one of {', '.join(LOOKS)}")
    if not bool(torch.isfinite(ink).all()):
        raise DataError("ink contains NaN or infinite values; ink maps hold values in [0, 1]")
    g = torch.Generator().manual_seed(check_seed(seed, hint="it seeds each image's colour jitter"))
    jitter = torch.randn(ink.shape[0], 3, 1, 1, generator=g).clamp(-2, 2)
    rgb = STYLE_FUNCTIONS[style](ink.float(), jitter).clamp(0, 1)
    return rgb * 2 - 1
