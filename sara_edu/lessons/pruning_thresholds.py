"""Pruning by magnitude: zero every parameter with |w| < θ and see what the model still draws.

This is the experiment behind SaRA's claim that the smallest weights of a
pretrained UNet are (temporarily) ineffective: zero the smallest 5-20% and the
samples barely change; zero much more and they fall apart. The tools:

* :func:`prune_below` - a context manager that zeroes in place and restores
  every value bit for bit on exit (no copy of the model);
* :func:`pruned_copy` - a pruned deep copy, when both models are needed at once;
* :func:`fraction_below` / :func:`threshold_for_fraction` - θ <-> fraction;
* :func:`quality_vs_pruning` - the paper's curve: quality metrics against the
  fraction pruned.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .weight_distributions import (
    block_of,
    global_threshold,
    layer_of,
    named_weights,
    parameter_kind,
    plot_fraction_by_layer,
)

DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def _check_threshold(threshold) -> float:
    # inf is allowed: it is threshold_for_fraction(model, 1.0), "everything"
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or threshold < 0:
        raise ConfigError(f"threshold θ must be a number >= 0 (e.g. 2e-3), got {threshold!r}")
    return float(threshold)


@dataclass
class PruneReport:
    """What :func:`prune_below` did: ``pruned`` of ``total`` parameters zeroed at ``threshold``."""

    threshold: float
    pruned: int
    total: int

    @property
    def fraction(self) -> float:
        return self.pruned / self.total if self.total else 0.0


@contextmanager
def prune_below(model, threshold: float):
    """Zero every parameter with |w| < ``threshold`` inside the ``with`` block, then restore it.

    ``model``: a TinyDiffusion (its UNet is pruned) or any ``nn.Module``. Yields a
    :class:`PruneReport`. Only the zeroed values are kept aside (not a copy of the
    model), and they are written back exactly, bit for bit, even if the block
    raises.

        with prune_below(pipe, 2e-3) as report:
            images = generate(pipe, prompts)
    """
    threshold = _check_threshold(threshold)
    if isinstance(model, dict):
        raise ConfigError("prune_below needs a model (module or TinyDiffusion), not a state dict")
    weights = named_weights(model)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    pruned = total = 0
    try:
        with torch.no_grad():
            for w in weights.values():
                mask = w.abs() < threshold
                saved.append((w, mask, w[mask].clone()))
                w[mask] = 0
                pruned += int(mask.sum())
                total += w.numel()
        yield PruneReport(threshold, pruned, total)
    finally:
        with torch.no_grad():
            for w, mask, values in saved:
                w[mask] = values


def pruned_copy(model, threshold: float):
    """A deep copy of ``model`` (pipe or module) with every |w| < ``threshold`` set to zero."""
    threshold = _check_threshold(threshold)
    if hasattr(model, "unet") and isinstance(model.unet, torch.nn.Module):
        from ..world.model import TinyDiffusion

        clone = TinyDiffusion(copy.deepcopy(model.unet), model.text_encoder, dict(model.scheduler_config))
    elif isinstance(model, torch.nn.Module):
        clone = copy.deepcopy(model)
    else:
        raise ConfigError(f"pruned_copy needs a TinyDiffusion or an nn.Module, got {type(model).__name__}")
    with torch.no_grad():
        for w in named_weights(clone).values():
            w[w.abs() < threshold] = 0
    return clone


def fraction_below(model, threshold: float):
    """``(overall, table)``: the share of all parameters with |w| < ``threshold``, and one row
    per parameter tensor (``name, layer, block, kind, numel, below, fraction``)."""
    import pandas as pd

    threshold = _check_threshold(threshold)
    rows = []
    for name, w in named_weights(model).items():
        below = int((w.abs() < threshold).sum())
        rows.append({"name": name, "layer": layer_of(name), "block": block_of(name), "kind": parameter_kind(name),
                     "numel": w.numel(), "below": below, "fraction": below / w.numel()})
    table = pd.DataFrame(rows)
    return float(table.below.sum() / table.numel.sum()), table


def threshold_for_fraction(model, fraction: float) -> float:
    """The θ that puts ``fraction`` of all parameters below it (0.1 -> the smallest 10%)."""
    return global_threshold(model, fraction)


# ----------------------------------------------------------------------------- figures / widget logic

def plot_fraction_below(model, threshold: float):
    """Figure: the share of each parameter tensor with |w| < θ, and the overall share in the title.

    The logic behind notebook 02's θ slider.
    """
    overall, table = fraction_below(model, threshold)
    return plot_fraction_by_layer(
        table, "fraction", reference=overall, reference_label=f"all parameters: {overall:.1%}",
        title=f"θ = {threshold:.2e}: {overall:.1%} of all {int(table.numel.sum()):,} parameters have |w| < θ",
        ylabel="fraction with |w| < θ")


def sample_comparison(pipe, *, digits=range(10), seed: int = 0, steps: int = 25, guidance_scale: float = 3.0,
                      style: str | None = None):
    """Return ``update(fraction)`` -> Figure: samples of the unpruned model (top row) beside the
    same prompts and seeds with the smallest ``fraction`` of parameters zeroed (bottom row).

    The unpruned row is generated once and reused, so moving the slider only pays
    for the pruned row. The logic behind notebook 02's fraction slider.
    """
    from ..world.model import generate
    from ..world.text import make_prompt
    from .display import show_images

    digits = list(digits)
    prompts = [make_prompt(d, style) for d in digits]
    cache = {}

    def update(fraction: float = 0.1):
        if "original" not in cache:
            cache["original"] = generate(pipe, prompts, steps=steps, seed=seed, guidance_scale=guidance_scale)
        theta = threshold_for_fraction(pipe, fraction)
        with prune_below(pipe, theta) as report:
            pruned = generate(pipe, prompts, steps=steps, seed=seed, guidance_scale=guidance_scale)
        images = torch.cat([cache["original"], pruned])
        return show_images(images, titles=[f"'{d}'" for d in digits] * 2, nrow=len(digits),
                           row_labels=["original", f"{report.fraction:.0%} zeroed"],
                           suptitle=f"Same prompts and seeds; smallest {report.fraction:.1%} of |w| zeroed "
                                    f"(θ = {theta:.2e}), {steps} sampling steps")

    return update


def quality_vs_pruning(pipe, fractions=DEFAULT_FRACTIONS, n_per_digit: int = 10, seed: int = 0, steps: int = 25,
                       guidance_scale: float = 3.0, style: str | None = None, digits=range(10), evaluate=None,
                       progress: bool = True):
    """The paper's curve: generation quality against the fraction of smallest-|w| parameters zeroed.

    For each fraction, θ is the global threshold for it (computed once from the
    unpruned weights); the model is pruned in place, evaluated with
    :func:`sara_edu.world.metrics.evaluate` (same prompts and seeds every time) and
    restored. Returns a DataFrame with ``fraction, threshold, pruned_fraction,
    fid, digit_acc, look_acc, agreement, seconds`` (one row per fraction).

    ``evaluate``: a replacement for ``metrics.evaluate`` with the same signature
    (for tests or another metric).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    fractions = list(fractions)
    if not fractions:
        raise ConfigError("give at least one fraction to prune, e.g. fractions=(0, 0.1, 0.3)")
    for f in fractions:
        if not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ConfigError(f"fractions must lie in [0, 1) (0.1 = 10%), got {f!r}")
    if n_per_digit < 1:
        raise ConfigError(f"n_per_digit must be >= 1, got {n_per_digit}")
    if evaluate is None:
        from ..world.metrics import evaluate
    from .weight_distributions import global_thresholds

    thresholds = global_thresholds(pipe, fractions)  # from the *unpruned* weights, before any pruning
    rows = []
    for fraction, theta in tqdm(list(zip(fractions, thresholds)), desc="pruning", disable=not progress):
        start = time.perf_counter()
        with prune_below(pipe, theta) as report:
            scores = evaluate(pipe, style=style, digits=list(digits), n_per_digit=n_per_digit, seed=seed, steps=steps,
                              guidance_scale=guidance_scale)
        rows.append({"fraction": fraction, "threshold": theta, "pruned_fraction": report.fraction,
                     **{k: float(scores[k]) for k in ("fid", "digit_acc", "look_acc", "agreement")},
                     "seconds": time.perf_counter() - start})
    return pd.DataFrame(rows)


def plot_quality_vs_pruning(table):
    """Two panels from :func:`quality_vs_pruning`: FID analogue (lower is better) and
    digit / look accuracy and prompt agreement (higher is better) against % zeroed."""
    import matplotlib.pyplot as plt

    x = 100 * table["pruned_fraction"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot(x, table["fid"], "o-", color="tab:red")
    left.set_ylabel("FID analogue (feature units²,\nlower is better)")
    left.set_title("Distance of samples to real digits")
    for col, style, label in (("agreement", "o-", "prompt agreement (digit and look right)"),
                              ("digit_acc", "s--", "digit accuracy"), ("look_acc", "^:", "look accuracy")):
        right.plot(x, 100 * table[col], style, label=label)
    right.set_ylabel("% of samples (higher is better)")
    right.set_ylim(0, 105)
    right.set_title("Do samples still follow the prompt?")
    right.legend(fontsize=8, loc="lower left")
    for ax in (left, right):
        ax.set_xlabel("parameters zeroed\n(% of the UNet, smallest |w| first)")
        ax.axvspan(0, 20, color="tab:green", alpha=0.07, lw=0)
        ax.grid(alpha=0.3)
    left.text(10, 0.98, "what SaRA\nretrains (≤ 20%)", transform=left.get_xaxis_transform(), ha="center",
              va="top", fontsize=8, color="tab:green")
    fig.suptitle("How much of the pretrained UNet can be zeroed before samples suffer?", fontsize=11)
    fig.tight_layout()
    return fig
