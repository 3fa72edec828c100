"""Notebook 05 (Stable Diffusion on a GPU): load the real model, or a tiny stand-in."""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..sd.load import SD15_ID, StableDiffusionAdapter, load_stable_diffusion
from ..sd.tiny import tiny_sd_pipeline


def load_or_stand_in(model_id_or_path=SD15_ID, device=None) -> tuple["StableDiffusionAdapter", bool, str]:
    """Stable Diffusion on a GPU, else the tiny SD-shaped stand-in: ``(pipe, is_real, why)``.

    Fine-tuning SD1.5 on a CPU would take days, so without CUDA (or when the
    weights cannot be loaded) the notebook runs the very same code on
    :func:`tiny_sd_pipeline`. ``why`` says plainly which one you got and why.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        why = ("No CUDA GPU here: fine-tuning Stable Diffusion 1.5 (860M-parameter UNet) on a CPU would take days. "
               "Running the same code on tiny_sd_pipeline(), a randomly initialised SD-shaped model (64 px): "
               "its samples are noise; the point is that every cell runs. Open this notebook on a GPU for real results.")
        return tiny_sd_pipeline(seed=0, device=device), False, why
    try:
        return load_stable_diffusion(model_id_or_path, device=device), True, f"Loaded {model_id_or_path} on {device}."
    except CheckpointError as e:
        why = (f"Could not load {model_id_or_path}: {e}\nRunning the same code on tiny_sd_pipeline() instead "
               "(a randomly initialised, SD-shaped model).")
        return tiny_sd_pipeline(seed=0, device=device), False, why


SUMMARY_COLUMNS = ("peak memory (MB)", "step time (s, median)", "saved file (MB)")


def training_step_time(history, device, skip: int = 1) -> float:
    """Median seconds per training step after ``skip`` warm-up steps, or NaN where it would not be fair.

    On CUDA the notebook trains without the memory tracker and the steps' wall times
    are what the benchmark measures too. On a CPU the notebook trains *with* the
    tracker (it is how the CPU's memory is counted), which slows every operation:
    those times would compare the tracker, not the methods, so none is reported
    (``benchmarks/memory_time.py`` times CPU steps fairly).
    """
    if torch.device(device).type != "cuda" or len(history) <= skip:
        return float("nan")
    return float(history.step_time_s.iloc[skip:].median())


def plot_sd_summary(summary, full_unet_mb: float, title: str = ""):
    """Notebook 05's cost figure: peak memory, median step time and saved file size per method.

    ``summary``: one row per method (index: method name) with :data:`SUMMARY_COLUMNS`.
    The file sizes span orders of magnitude (an adapter of a few MB beside a UNet of
    gigabytes), so that panel is log-scale, with a label per decade only and the
    full UNet (``full_unet_mb``, fp32) as a dashed line; every bar carries its value.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from ..errors import ConfigError

    missing = [c for c in SUMMARY_COLUMNS if c not in getattr(summary, "columns", ())]
    if missing:
        raise ConfigError(f"summary lacks the column(s) {missing}; build it as notebook 05 does (one row per method)")
    if not full_unet_mb > 0:
        raise ConfigError(f"full_unet_mb must be the size of the whole UNet in MB (> 0), got {full_unet_mb!r}")
    names = list(summary.index)
    colours = [{"SaRA": "tab:red", "LoRA": "tab:blue"}.get(n, "0.5") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, column in zip(axes, SUMMARY_COLUMNS):
        values = summary[column].astype(float)
        ax.bar(range(len(names)), values, color=colours, width=0.6)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(column, fontsize=10)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:,.0f}" if v >= 100 else f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    files = axes[2]
    files.axhline(full_unet_mb, color="grey", ls="--", label=f"full UNet (fp32): {full_unet_mb:,.0f} MB")
    files.set_yscale("log")
    low = min(float(summary[SUMMARY_COLUMNS[2]].min()), full_unet_mb)
    files.set_ylim(low / 3, full_unet_mb * 4)  # room for the labels above the bars and the line
    files.yaxis.set_major_locator(LogLocator(base=10, numticks=8))  # one label per decade
    files.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    files.yaxis.set_minor_formatter(NullFormatter())  # minor ticks stay, unlabelled
    files.legend(fontsize=7, loc="upper left")
    for ax in axes[:2]:
        ax.set_ylim(0, max(float(ax.get_ylim()[1]), 1e-9) * 1.12)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
