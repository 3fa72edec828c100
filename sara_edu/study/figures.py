"""The study's figures: Table 1 as bars, the trade-offs, the cost and the sensitivity sweeps (matplotlib
``Figure`` objects, no pyplot: no global state, works in notebooks and headless)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .config import PRETRAINED
from .select import in_phase, label, main_rows, methods_in
from .stats import seed_stats, style_mean_stats
from .tables import METRICS

FIGURES = {"table1": "study_table1.png", "tradeoff": "study_tradeoff.png", "cost": "study_cost.png",
           "sensitivity": "study_sensitivity.png"}


def _figure(**kw):
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, works in notebooks and headless
    )

    return Figure(**kw)


def save_png(fig, path: Path) -> Path:
    from ..io import atomic_write_bytes

    return atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _colors(methods):
    from ..colours import method_colour  # the notebooks' colours: SaRA red, LoRA blue, full fine-tuning green

    return {m: method_colour(m) for m in methods}


def figure_table1(df: pd.DataFrame):
    """Grouped bars: FID, agreement and VLHI per style (and the mean), one bar per method, error = std over seeds."""
    rows = main_rows(df)
    styles = list(dict.fromkeys(rows["style"])) + ["mean"]
    methods = methods_in(rows)
    colors = _colors(methods)
    fig = _figure(figsize=(13, 8.5))
    axes = fig.subplots(3, 1, sharex=True)
    width = 0.8 / max(len(methods), 1)
    for ax, (c, name, _) in zip(axes, METRICS):
        st, mean = seed_stats(rows, c), style_mean_stats(rows, c)
        for i, m in enumerate(methods):
            ys = [mean.at[m, "mean"] if s == "mean" else st["mean"].get((m, s), np.nan) for s in styles]
            es = [mean.at[m, "std"] if s == "mean" else st["std"].get((m, s), np.nan) for s in styles]
            ax.bar(np.arange(len(styles)) + (i - (len(methods) - 1) / 2) * width, ys, width, yerr=es, capsize=2,
                   color=colors[m], label=label(m, rows))
        if c != "vlhi":
            pre = df[(df.method == PRETRAINED) & df["style"].isin(styles)]
            if len(pre):
                ax.axhline(pre[c].mean(), color="k", ls=":", lw=1, label="pretrained (mean over styles)")
        ax.set_ylabel(name)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(styles)), styles)
    axes[0].legend(ncol=4, fontsize=8, loc="upper left", bbox_to_anchor=(0, 1.45))
    fig.suptitle("Table 1 on the course model: mean ± std over seeds", y=1.04)
    return fig


def figure_tradeoff(df: pd.DataFrame):
    """Left: style FID vs prompt agreement (the balance VLHI scores). Right: style agreement vs retention."""
    rows = main_rows(df)
    methods = methods_in(rows)
    colors = _colors(methods)
    fig = _figure(figsize=(12, 4.8))
    ax1, ax2 = fig.subplots(1, 2)
    for m in methods:
        r = rows[rows.method == m]
        per_seed = r.groupby("seed")[["fid", "agreement", "plain_agreement"]].mean()
        kw = dict(color=colors[m], capsize=3, marker="o", label=label(m, rows))
        ax1.scatter(r.fid, r.agreement, color=colors[m], alpha=0.25, s=12)
        ax1.errorbar(per_seed.fid.mean(), per_seed.agreement.mean(), xerr=per_seed.fid.std(),
                     yerr=per_seed.agreement.std(), **kw)
        ax2.scatter(r.agreement, r.plain_agreement, color=colors[m], alpha=0.25, s=12)
        ax2.errorbar(per_seed.agreement.mean(), per_seed.plain_agreement.mean(), xerr=per_seed.agreement.std(),
                     yerr=per_seed.plain_agreement.std(), **kw)
    pre = df[(df.method == PRETRAINED) & df["style"].isin(rows["style"].unique())]
    if len(pre):
        ax1.scatter(pre.fid.mean(), pre.agreement.mean(), marker="x", color="k", label="pretrained")
        ax2.axhline(pre.plain_agreement.mean(), color="k", ls=":", lw=1, label="pretrained")
    ax1.set(xlabel="style FID analogue (lower = closer to the style set)",
            ylabel="prompt agreement (digit and style right)", title="Style fit vs prompt agreement")
    ax2.set(xlabel="prompt agreement on the trained style", ylabel="plain-prompt agreement after fine-tuning",
            title="Learning the style vs keeping the pretrained skill")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle("Each faint dot is one run (style × seed); big markers: mean ± std over seeds of the style average")
    return fig


def figure_cost(df: pd.DataFrame):
    rows = main_rows(df)
    methods = methods_in(rows)
    colors = _colors(methods)
    fig = _figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, (col, name, scale) in zip(axes, (("trainable_params", "trainable numbers", 1),
                                             ("peak_memory_mb", "peak memory above frozen (MB)", 1),
                                             ("step_time_s", "median step time (s)", 1),
                                             ("file_size_bytes", "saved file (KB)", 1 / 1024))):
        vals = [rows.loc[rows.method == m, col].median() * scale for m in methods]
        ax.bar(range(len(methods)), vals, color=[colors[m] for m in methods])
        ax.set_xticks(range(len(methods)), [label(m, rows) for m in methods], rotation=60, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        if col in ("trainable_params", "file_size_bytes"):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Cost per method (median over runs)")
    return fig


def _sweep(df: pd.DataFrame, phase: str, col: str) -> pd.DataFrame:
    rows = df[in_phase(df, phase) & (df.status == "ok")]
    return rows.groupby(col).agg(**{f"{m}_{s}": (m, s) for m in ("fid", "agreement", "plain_agreement", "theta",
                                                                  "unseen_agreement")
                                    for s in ("mean", "std")}, n=("seed", "count")).reset_index()


def figure_sensitivity(df: pd.DataFrame):
    """The paper's sensitivity figure: quality against the trained fraction (θ) and against λ."""
    fig = _figure(figsize=(11, 8))
    axes = fig.subplots(3, 2, sharex="col")
    for j, (phase, col, title) in enumerate((("sweep_fraction", "fraction", "trained fraction (θ = its |w| quantile)"),
                                             ("sweep_lambda", "rank_lambda", "nuclear-norm weight λ"))):
        s = _sweep(df, phase, col)
        if len(s) == 0:
            axes[0, j].set_title(f"{title}: no runs")
            continue
        x = s[col].to_numpy(dtype=float)
        xpos = np.arange(len(x))  # λ includes 0: equally spaced categories read better than a log axis
        for i, (metric, name) in enumerate((("fid", "style FID↓"), ("agreement", "style agreement↑"),
                                            ("plain_agreement", "plain agreement (retention)↑"))):
            ax = axes[i, j]
            ax.errorbar(xpos, s[f"{metric}_mean"], yerr=s[f"{metric}_std"].fillna(0), marker="o", capsize=3,
                        label="digits 0-6 (trained)" if metric == "agreement" else None)
            if metric == "agreement":
                ax.errorbar(xpos, s["unseen_agreement_mean"], yerr=s["unseen_agreement_std"].fillna(0), marker="s",
                            capsize=3, ls="--", label="unseen digits")
                ax.legend(fontsize=8)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if metric == "fid":  # don't let autoscaling blow a 1% wiggle up to the full panel height
                lo, hi = ax.get_ylim()
                mid, half = (lo + hi) / 2, max((hi - lo) / 2, 0.1 * abs((lo + hi) / 2))
                ax.set_ylim(max(0, mid - half), mid + half)
            else:  # agreements are fractions
                ax.set_ylim(-0.03, 1.03)
        if col == "fraction":
            labels = [f"{v:.0%}\nθ={t:.2g}" for v, t in zip(x, s["theta_mean"])]
        else:
            labels = [f"{v:g}" for v in x]
        axes[-1, j].set_xticks(xpos, labels, fontsize=8)
        axes[-1, j].set_xlabel(title)
        style = df.loc[in_phase(df, phase), "style"].iloc[0]
        axes[0, j].set_title(f"SaRA vs {title}\n({int(s.n.max())} seed(s), style {style})", fontsize=10)
    return fig
