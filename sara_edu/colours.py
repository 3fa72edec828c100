"""One colour per method in every figure, in the notebooks and in the study's reports.

SaRA and its variants are reds, LoRA's are blues, full fine-tuning's greens, the pretrained model grey: a
reader who learned the colours in one figure reads the next one without its legend. Figures ask
:func:`method_colour` with a study method key (``"lora_matched"``) or the name a notebook shows (``"LoRA"``).
"""
from __future__ import annotations

#: Study method key -> colour. Variants of one method share its hue, lighter or darker.
BY_KEY = {
    "pretrained": "0.55",
    "sara": "#d62728",                 # matplotlib's tab:red
    "sara_no_nuclear": "#ff9896",
    "sara_no_progressive": "#8c1c13",
    "sara_attention": "#f7b6a0",
    "selective": "#9467bd",            # tab:purple: the same entries as SaRA, trained the textbook way
    "lora_matched": "#1f77b4",         # tab:blue
    "lora_r4": "#9ecae1",
    "lora_everywhere": "#08306b",
    "full": "#2ca02c",                 # tab:green
    "full_attention": "#a1d99b",
}

#: The names the notebooks show -> study method key.
BY_NAME = {
    "SaRA": "sara", "LoRA": "lora_matched", "full fine-tuning": "full", "selective (no UB)": "selective",
    "pretrained": "pretrained", "pretrained (no fine-tuning)": "pretrained",
    "SaRA on attention": "sara_attention", "LoRA everywhere": "lora_everywhere",
    "full FT of attention": "full_attention", "LoRA r=4": "lora_r4",
}

OTHER = "0.35"  # a method this table does not know


def method_colour(name: str, default: str | None = OTHER) -> str | None:
    """The colour of a method, by study key or shown name (case-insensitive); ``default`` if it is not a method
    (dark grey; None lets a figure pick its own colour for each unknown run)."""
    key = BY_NAME.get(name, name)
    if key not in BY_KEY:
        lowered = {k.lower(): v for k, v in BY_NAME.items()}
        key = lowered.get(str(name).lower(), str(name).lower())
    return BY_KEY.get(key, default)
