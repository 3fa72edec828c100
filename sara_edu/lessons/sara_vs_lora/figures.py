"""Notebook 04, drawing the comparison: costs, losses and samples side by side."""
from __future__ import annotations


import pandas as pd
import torch

from ...colours import method_colour
from ...errors import ConfigError
from ...measure.memory import CATEGORIES, CATEGORY_LABELS, MB, MemoryReport
from .training import REFERENCE, Comparison

# ------------------------------------------------------------------ costs

def memory_breakdown_frame(obj) -> pd.DataFrame:
    """Peak memory per method, split by what it holds (MB): one row per method.

    ``obj``: a :class:`Comparison` or ``{name: MemoryReport}``. Columns: the
    :data:`~sara_edu.measure.memory.CATEGORIES` (trainable values, optimizer state,
    gradients, method buffers, activations + transients), whose sum is
    ``peak above frozen``, and ``frozen weights`` (there whatever the method).
    """
    reports = obj.memory if isinstance(obj, Comparison) else dict(obj)
    if not reports:
        raise ConfigError("no memory reports to show")
    rows = {}
    for name, r in reports.items():
        if not isinstance(r, MemoryReport):
            raise ConfigError(f"expected MemoryReport values, got {type(r).__name__} for {name!r}")
        rows[name] = {**{CATEGORY_LABELS[c]: getattr(r, c) / MB for c in CATEGORIES},
                      "peak above frozen": r.peak_above_frozen / MB, "frozen weights": r.frozen_weights / MB}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method (MB)")


def _short_names(names, width: int = 12) -> list[str]:
    """Method names wrapped onto lines of about ``width`` characters, for tick labels under narrow bars."""
    import textwrap

    return [textwrap.fill(str(n), width, break_on_hyphens=False) for n in names]


def _stacked_memory(ax, frame: pd.DataFrame, columns, palette) -> pd.Series:
    """Stack ``columns`` (MB) per method on ``ax``; return each method's total."""
    names = list(frame.index)
    bottom = pd.Series(0.0, index=names)
    for col in columns:
        ax.bar(range(len(names)), frame[col], bottom=bottom, label=col, color=palette[col], width=0.6)
        bottom += frame[col]
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(float(bottom.max()), 1e-9) * 1.18)
    ax.set_xticks(range(len(names)), _short_names(names), fontsize=8)
    return bottom


MODEL_WEIGHTS = "model weights (every method holds them once)"
# The parts of memory, in colours no method uses (SaRA red, LoRA blue, full fine-tuning green: sara_edu.colours)
MEMORY_COLOURS = ("0.8", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "#c5b0d5")
TRAINED_EXTRA = "trainable values beyond the model's weights"


def memory_with_the_model(comparison: Comparison) -> pd.DataFrame:
    """Peak memory per method (MB) with the UNet's weights counted once for *every* method.

    :func:`memory_breakdown_frame` counts what lies above the frozen weights: full fine-tuning's weights
    are its trainable values there, while SaRA's and LoRA's frozen UNet is not counted at all. Here each
    method holds :data:`MODEL_WEIGHTS` (the UNet, frozen or trained in place) and only what it adds on top
    as :data:`TRAINED_EXTRA` (SaRA's value copies, LoRA's adapter; 0 for full fine-tuning), then its
    optimizer state, gradients, buffers and activations.
    """
    frame = memory_breakdown_frame(comparison)
    model_mb = sum(p.numel() * p.element_size() for p in comparison.base.unet.parameters()) / MB
    out = pd.DataFrame({MODEL_WEIGHTS: model_mb,
                        TRAINED_EXTRA: (frame[CATEGORY_LABELS["trainable_values"]] + frame["frozen weights"]
                                        - model_mb).clip(lower=0)}, index=frame.index)
    for c in CATEGORIES[1:]:
        out[CATEGORY_LABELS[c]] = frame[CATEGORY_LABELS[c]]
    return out


def plot_costs(comparison: Comparison, title: str | None = None):
    """What each method costs, in two rows sized for the notebook column.

    Top: peak training memory above the frozen weights split by what it holds (MB), and
    next to it the method's *own* memory (the same parts without activations + transients,
    which are set by the batch and the model, not the method) on its own scale, so that a
    difference of a few MB is not lost beside tens of MB of activations. Bottom: median
    step time (s), trained values (thousands) and saved file size (MB).
    """
    import matplotlib.pyplot as plt

    frame = memory_with_the_model(comparison)
    costs = comparison.costs()
    names = list(frame.index)
    fig = plt.figure(figsize=(9, 7.9))
    grid = fig.add_gridspec(3, 6, height_ratios=[1.25, 0.2, 1])  # the middle row holds the legend
    everything, own = fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:])
    palette = dict(zip(frame.columns, MEMORY_COLOURS))
    method_parts = [c for c in frame.columns if c not in (MODEL_WEIGHTS, CATEGORY_LABELS["activations_transients"])]
    _stacked_memory(everything, frame, frame.columns, palette)
    everything.set_ylabel("MB at the peak, the UNet's weights included")
    everything.set_title("Peak training memory, all of it", fontsize=10)
    _stacked_memory(own, frame, method_parts, palette)
    own.set_ylabel("MB at the peak")
    own.set_title("What the method adds to the model\n(without activations), on its own scale", fontsize=10)
    legend = fig.add_subplot(grid[1, :])
    legend.axis("off")
    legend.legend(*everything.get_legend_handles_labels(), fontsize=8, loc="center", ncol=3, frameon=False)
    colours = [method_colour(n) for n in names]
    clock = "process CPU s" if comparison.step_times is None else comparison.step_times.clock.iloc[0]
    panels = [("median step time (s)", 1, f"seconds per step ({clock})", "Step time (fair, interleaved)", "{:.3f} s"),
              ("trainable parameters", 1e3, "thousands of numbers trained", "Trained values", "{:,.0f}k"),
              ("saved file (MB)", 1, "MB on disk", "Saved file (what you ship)", "{:.2f} MB")]
    for i, (column, unit, ylabel, panel_title, fmt) in enumerate(panels):
        ax = fig.add_subplot(grid[2, 2 * i:2 * i + 2])
        values = costs[column].reindex(names) / unit
        ax.bar(range(len(names)), values, color=colours, width=0.6)
        for x, v in enumerate(values):
            ax.text(x, v, fmt.format(v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), _short_names(names), fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylim(0, max(float(values.max()), 1e-12) * 1.2)
    for ax in fig.axes:
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    s = comparison.settings
    fig.suptitle(title or f"What fine-tuning costs: {s.get('steps')} steps, batch {s.get('batch_size')}, "
                          f"'{comparison.style}' style\n(memory: attach + first {s.get('tracked_steps')} steps, CPU)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot_losses(histories: dict, window: int = 10, ax=None, title: str = "Training loss"):
    """Loss per step (thin) and its running mean over ``window`` steps (thick), one colour per run."""
    import matplotlib.pyplot as plt

    histories = histories.histories if isinstance(histories, Comparison) else histories
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    for i, (name, h) in enumerate(histories.items()):
        # a run named after a method gets its colour; differently named runs each get their own
        colour = method_colour(name, default=None) or plt.get_cmap("tab10")(i)
        dashes = ("-", "--", ":", "-.")[i % 4]  # runs that coincide stay visible
        ax.plot(h.step, h.loss, color=colour, alpha=0.25, lw=0.8, ls=dashes)
        ax.plot(h.step, h.loss.rolling(window, min_periods=1).mean(), color=colour, lw=2, ls=dashes, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("denoising loss (MSE of predicted noise)")
    ax.set_title(f"{title} (thick: mean of the last {window} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


# ------------------------------------------------------------------ samples

def _check_pipes(pipes) -> dict:
    if isinstance(pipes, Comparison):
        pipes = pipes.pipes
    if not isinstance(pipes, dict) or not pipes:
        raise ConfigError("pipes must be a non-empty dict {label: pipe}, e.g. comparison.pipes")
    return pipes


def side_by_side(pipes, prompt: str, seed: int = 0, n: int = 6, steps: int = 25, guidance_scale: float = 3.0,
                 methods=None, cache: dict | None = None):
    """One row of ``n`` samples per model for the same ``prompt`` and the same starting noise.

    Image ``i`` of every row starts from noise seeded ``seed + i``
    (:func:`sara_edu.generate`), so differences between rows come from the
    models only. ``methods``: which labels of ``pipes`` to show (default all).
    ``cache``: a dict reused between calls to skip rows already generated.
    """
    from ...world.model import generate
    from ..display import show_images

    pipes = _check_pipes(pipes)
    labels = list(pipes) if methods is None else list(methods)
    unknown = [m for m in labels if m not in pipes]
    if unknown or not labels:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {list(pipes)}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (samples per model) must be a positive integer, got {n!r}")
    rows = []
    for label in labels:
        key = (label, prompt, seed, n, steps, guidance_scale)
        if cache is None or key not in cache:
            images = generate(pipes[label], [prompt] * n, steps=steps, seed=seed, guidance_scale=guidance_scale)
            if cache is None:
                rows.append(images)
                continue
            cache[key] = images
        rows.append(cache[key])
    return show_images(torch.cat(rows), nrow=n, row_labels=labels,
                       suptitle=f"'{prompt}': seeds {seed}..{seed + n - 1} (same noise in every row), "
                                f"{steps} DDIM steps, guidance {guidance_scale:g}")


def side_by_side_view(pipes, *, n: int = 6, steps: int = 25, guidance_scale: float = 3.0):
    """``update(digit, style, seed, method) -> Figure`` for notebook 04's widget.

    ``method="all"`` shows every model (the pretrained one first); a single name
    shows the pretrained model and that one. Rows already generated are cached,
    so going back to an earlier setting is instant.
    """
    from ...world.text import make_prompt

    pipes = _check_pipes(pipes)
    cache: dict = {}

    def update(digit: int = 3, style: str = "plain", seed: int = 0, method: str = "all"):
        prompt = make_prompt(int(digit), None if style in (None, "", "plain") else style)
        if method == "all":
            shown = list(pipes)
        elif method in pipes:
            shown = [m for m in (REFERENCE, method) if m in pipes] if method != REFERENCE else [method]
        else:
            raise ConfigError(f"unknown method {method!r}; choose 'all' or one of {list(pipes)}")
        return side_by_side(pipes, prompt, seed=int(seed), n=n, steps=steps, guidance_scale=guidance_scale,
                            methods=shown, cache=cache)

    return update
