"""A tiny frozen text encoder: the course model's stand-in for CLIP.

Stable Diffusion conditions its UNet on ``encoder_hidden_states`` from a frozen
CLIP text encoder. Here a prompt such as ``"a digit 3, cyberpunk style"`` is
split into words from a fixed vocabulary, and each word becomes a fixed random
embedding plus a position embedding. The style words are in the vocabulary from
the start but never appear in pretraining, just like a concept the real text
encoder knows but the UNet never learned to draw: fine-tuning must teach the
UNet what those embeddings mean.
"""
from __future__ import annotations

import numbers
import re

import torch
from torch import nn

from ..errors import PromptError

STYLES = ("barbiecore", "cyberpunk", "elementfire", "expedition", "hornify")
DIGIT_WORDS = tuple(str(d) for d in range(10))
VOCAB = ("<pad>", "a", "digit", *DIGIT_WORDS, "style", *STYLES)
MAX_TOKENS = 6  # "a digit 3 cyberpunk style" is 5 words
EMBED_DIM = 32


def make_prompt(digit: int, style: str | None = None) -> str:
    """The course's prompt for a digit, optionally in one of the five styles."""
    if isinstance(digit, bool) or not isinstance(digit, numbers.Integral) or not 0 <= digit <= 9:
        raise PromptError(f"digit must be an integer 0..9, got {digit!r}")
    if style is not None and not isinstance(style, str):
        raise PromptError(f"style must be a style name or None, got {type(style).__name__} {style!r}; "
                          f"choose one of {', '.join(STYLES)}")
    if style in (None, "", "plain"):
        return f"a digit {int(digit)}"
    if style.lower() not in STYLES:
        raise PromptError(f"unknown style {style!r}; choose one of {', '.join(STYLES)} (or None for plain)")
    return f"a digit {int(digit)}, {style.lower()} style"


def tokenize(prompt: str) -> list[int]:
    """Words of ``prompt`` (commas and case ignored) as vocabulary ids, padded."""
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string such as {make_prompt(3)!r}, got {type(prompt).__name__} "
                          f"{prompt!r}")
    words = [w for w in re.split(r"[\s,]+", prompt.lower().strip()) if w]
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
        raise PromptError(
            f"prompt {prompt!r} uses word(s) {unknown} outside the vocabulary. "
            f"Known words: {' '.join(VOCAB[1:])}. Example: {make_prompt(3, 'cyberpunk')!r}"
        )
    if len(words) > MAX_TOKENS:
        raise PromptError(f"prompt {prompt!r} has {len(words)} words; at most {MAX_TOKENS} fit")
    ids = [VOCAB.index(w) for w in words]
    return ids + [0] * (MAX_TOKENS - len(ids))


class TinyTextEncoder(nn.Module):
    """Token + position embeddings, frozen. ``encode(prompts) -> (B, MAX_TOKENS, EMBED_DIM)``."""

    def __init__(self, seed: int = 0, dim: int = EMBED_DIM):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.token = nn.Embedding(len(VOCAB), dim)
        self.position = nn.Embedding(MAX_TOKENS, dim)
        with torch.no_grad():
            self.token.weight.copy_(torch.randn(len(VOCAB), dim, generator=g))
            self.token.weight[0].zero_()  # padding carries no meaning
            self.position.weight.copy_(0.1 * torch.randn(MAX_TOKENS, dim, generator=g))
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, prompts: list[str] | str) -> torch.Tensor:
        from .sampling import check_prompts

        ids = torch.tensor([tokenize(p) for p in check_prompts(prompts)], device=self.token.weight.device)
        pos = torch.arange(MAX_TOKENS, device=ids.device)
        return self.token(ids) + self.position(pos)[None]

    encode = forward
