"""Notebook 04, scoring the comparison: the paper's metrics, what each model kept, how it generalises, and
the paper's claims as the course's study checked them."""
from __future__ import annotations


from pathlib import Path

import pandas as pd
import torch

from ...colours import method_colour
from ...errors import ConfigError, DataError
from .figures import _check_pipes, _short_names
from .training import REFERENCE, Comparison

def _committed_study(name: str, what: str) -> pd.DataFrame:
    """The committed rows of study ``name`` (``reports/``), or a DataError saying where ``what`` is."""
    from ...study.config import CONFIGS, results_csv
    from ...study.select import load_study

    csv = results_csv(CONFIGS[name])
    if not Path(csv).exists():
        report = "reports/study.md" if name == "full" else f"reports/{name}.md"
        raise DataError(f"no committed study at {csv}: {what} is in {report} of the course's repository "
                        f"(or run `python -m sara_edu.study run{'' if name == 'full' else ' --study ' + name}` "
                        "and `... report` there)")
    return load_study(csv, name)


def paper_claims() -> pd.DataFrame:
    """The paper's claims as the course's study checked them (``reports/study.md``), one row per claim.

    Read from the committed study (``reports/study_results.csv``) and benchmark results
    in a checkout of the repository; an installed package without them raises
    :class:`DataError` saying where to find the table.
    """
    from ...study.claims import CLAIMS_COLUMNS, claims_rows
    from ...world.paths import REPO_ROOT

    rows = claims_rows(_committed_study("full", "the claims table"), REPO_ROOT)
    return pd.DataFrame(rows, columns=CLAIMS_COLUMNS).set_index(CLAIMS_COLUMNS[0])


def where_how():
    """The controls study (``reports/controls.md``): prompt agreement as where x how, and the paired
    differences of methods that differ in one thing, as Markdown for a notebook cell."""
    from IPython.display import Markdown

    from ...study.tables import LEGEND_FIRST, controls_table, where_how_table

    df = _committed_study("controls", "the where-versus-how table")
    return Markdown("\n\n".join([where_how_table(df), f"Paired, one difference at a time ({LEGEND_FIRST}):",
                                  controls_table(df)]))


# ------------------------------------------------------------------ metrics

METRIC_COLUMNS = {
    "style_fid": "trained style, digits 0-6: FID analogue (lower is better)",
    "style_kid": "trained style, digits 0-6: KID analogue (unbiased on few samples; lower is better, ~0 = real)",
    "style_agreement": "trained style, digits 0-6: prompt agreement (digit and look right)",
    "style_gate_pass": "trained style, digits 0-6: share of samples that look like real images at all",
    "style_gated_agreement": "trained style, digits 0-6: prompt agreement counting only samples that pass the gate",
    "vlhi": "VLHI across the fine-tuned methods (0..2, higher is better)",
    "plain_agreement": "plain prompts, digits 0-9: prompt agreement (keeps the original skill)",
    "plain_fid": "plain prompts, digits 0-9: FID analogue",
    "unseen_agreement": "trained style, unseen digits 7-9: prompt agreement (generalises)",
    "unseen_look_acc": "trained style, unseen digits 7-9: look accuracy",
}


def metric_table(pipes, style: str, *, n_per_digit: int = 10, steps: int = 25, seed: int = 0,
                 guidance_scale: float = 3.0, finetune_digits=None, unseen_digits=None, evaluate=None,
                 progress: bool = True) -> pd.DataFrame:
    """The paper's metrics for each model, plus what it kept and how it generalises.

    For every model in ``pipes`` (a :class:`Comparison` or ``{label: pipe}``),
    with the same prompts and seeds for all:

    * **trained style** on the fine-tuning digits (0-6): ``style_fid`` (FID
      analogue against held-out styled digits), ``style_kid`` (the KID
      analogue beside it, unbiased on few samples), ``style_gate_pass`` and
      ``style_gated_agreement`` (:mod:`sara_edu.world.quality`), ``style_look_acc``,
      ``style_digit_acc``, ``style_agreement`` (the CLIP-score stand-in);
    * ``vlhi``: the paper's VLHI from ``style_fid`` and ``style_agreement``,
      normalised across the fine-tuned models only (the ``"pretrained"``
      reference row, which never saw the style, gets NaN);
    * **kept skill**: plain prompts for all digits 0-9, ``plain_fid``,
      ``plain_digit_acc``, ``plain_look_acc`` (still plain?), ``plain_agreement``;
    * **generalisation**: the style on the digits left out of fine-tuning (7-9),
      ``unseen_fid``, ``unseen_digit_acc``, ``unseen_look_acc``, ``unseen_agreement``.

    ``evaluate``: a stand-in for :func:`sara_edu.world.metrics.evaluate` with the same
    signature (tests use one). Returns one row per model, indexed by label.
    """
    from tqdm.auto import tqdm

    from ...world.data import FINETUNE_DIGITS, UNSEEN_DIGITS
    from ...world.metrics import vlhi_table

    if evaluate is None:
        from ...world.metrics import evaluate
    pipes = _check_pipes(pipes)
    if style in (None, "", "plain"):
        raise ConfigError("metric_table compares a fine-tuned *style*: give the style the models were trained on")
    if not isinstance(n_per_digit, int) or n_per_digit < 1:
        raise ConfigError(f"n_per_digit must be a positive integer, got {n_per_digit!r}")
    finetune_digits = list(FINETUNE_DIGITS if finetune_digits is None else finetune_digits)
    unseen_digits = list(UNSEEN_DIGITS if unseen_digits is None else unseen_digits)
    tasks = [("style", style, finetune_digits), ("plain", None, list(range(10))), ("unseen", style, unseen_digits)]
    keys = ("fid", "digit_acc", "look_acc", "agreement")
    rows = []
    bar = tqdm(total=len(pipes) * len(tasks), desc="evaluating", disable=not progress, leave=False)
    for label, pipe in pipes.items():
        row = {"method": label}
        for prefix, look, digits in tasks:
            scores = evaluate(pipe, style=look, digits=digits, n_per_digit=n_per_digit, seed=seed, steps=steps,
                              guidance_scale=guidance_scale)
            row.update({f"{prefix}_{k}": float(scores[k]) for k in keys})
            if prefix == "style":
                row.update({f"style_{k}": float(scores[k]) for k in ("kid", "gate_pass", "gated_agreement")})
            bar.update()
        rows.append(row)
    bar.close()
    table = pd.DataFrame(rows).set_index("method")
    tuned = table.drop(index=[REFERENCE], errors="ignore")
    table["vlhi"] = float("nan")
    if len(tuned):
        table.loc[tuned.index, "vlhi"] = vlhi_table(tuned, fid_col="style_fid", clip_col="style_agreement")["vlhi"]
    order = ["style_fid", "style_kid", "style_look_acc", "style_digit_acc", "style_agreement", "style_gate_pass",
             "style_gated_agreement", "vlhi",
             "plain_fid", "plain_digit_acc", "plain_look_acc", "plain_agreement",
             "unseen_fid", "unseen_digit_acc", "unseen_look_acc", "unseen_agreement"]
    table = table[order]
    table.attrs.update({"style": style, "n_per_digit": n_per_digit, "steps": steps, "seed": seed})
    return table


def plot_metric_table(table: pd.DataFrame, title: str | None = None):
    """Four bar panels from :func:`metric_table`: style FID, and prompt agreement (%) on the
    trained style, on plain prompts (kept skill) and on unseen digits (generalisation)."""
    import matplotlib.pyplot as plt

    missing = [c for c in ("style_fid", "style_agreement", "plain_agreement", "unseen_agreement") if c not in table]
    if missing:
        raise ConfigError(f"expected a table from metric_table(); missing columns {missing}")
    names = list(table.index)
    colours = [method_colour(n) for n in names]
    style = table.attrs.get("style", "the trained")
    panels = [("style_fid", "FID analogue (feature units²)", f"'{style}' style, digits 0-6\nFID (lower is better)", 1),
              ("style_agreement", "% of samples: digit and look right",
               f"'{style}' style, digits 0-6\nprompt agreement", 100),
              ("plain_agreement", "% of samples: digit right, still plain",
               "plain prompts, digits 0-9\nkept skill", 100),
              ("unseen_agreement", "% of samples: digit and look right",
               f"'{style}' style on unseen digits 7-9\ngeneralisation", 100)]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.8))  # 2 x 2: four panels in a row would not fit the column
    for ax, (col, ylabel, panel_title, scale) in zip(axes.flat, panels):
        values = table[col] * scale
        ax.bar(range(len(names)), values, color=colours, width=0.6)
        ax.set_xticks(range(len(names)), _short_names(names), fontsize=8)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.0f}" if scale == 100 or abs(v) >= 100 else f"{v:.3g}", ha="center", va="bottom",
                    fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel_title, fontsize=9)
        if scale == 100:
            ax.set_ylim(0, 110)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    n = table.attrs.get("n_per_digit")
    fig.suptitle(title or f"What each model learned, kept and generalised"
                          f"{f' ({n} samples per digit)' if n else ''}", fontsize=11)
    fig.tight_layout()
    return fig


def summary_table(comparison: Comparison, metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """Costs and (optionally) the headline metrics in one table, one row per method."""
    table = comparison.costs()[["trainable parameters", "saved file (MB)", "peak memory above frozen weights (MB)",
                                "median step time (s)"]]
    if metrics is not None:
        cols = [c for c in ("style_fid", "style_agreement", "vlhi", "plain_agreement", "unseen_agreement")
                if c in metrics]
        table = table.join(metrics[cols], how="outer")
        table = table.loc[[n for n in metrics.index if n in table.index] +
                          [n for n in table.index if n not in metrics.index]]
        table["trainable parameters"] = table["trainable parameters"].astype("Int64")  # a count, even beside NaN
    return table


def gate_figure(rows: dict, suptitle: str | None = None):
    """A sample grid that shows what the scores count: ``rows`` is ``{label: (images, passed, agrees)}``;
    each image is titled pass / reject (the quality gate) and ✓ / ✗ (the classifier's prompt agreement)."""
    from ...world.quality import verdict_title
    from ..display import show_images

    images = torch.cat([r[0] for r in rows.values()])
    titles = [verdict_title(p, a) for _, passed, agrees in rows.values() for p, a in zip(passed, agrees)]
    return show_images(images, titles, nrow=len(next(iter(rows.values()))[0]), row_labels=list(rows),
                       suptitle=suptitle or "Gate verdict per sample (✓/✗: the classifier's prompt agreement)")


def gated_samples(pipes, style: str, *, digits=range(7), seed: int = 0, steps: int = 25,
                  guidance_scale: float = 3.0):
    """One sample per digit and model for ``"a digit k, <style> style"``, marked with what the metric table
    counts: does it pass the quality gate (:mod:`sara_edu.world.quality`), does the classifier agree?"""
    from ...world.quality import judged_samples

    pipes = _check_pipes(pipes)
    digits = list(digits)
    if not digits:
        raise ConfigError("digits must name at least one digit, e.g. range(7)")
    rows = {label: judged_samples(pipe, style, digits, seed=seed, steps=steps, guidance_scale=guidance_scale)
            for label, pipe in pipes.items()}
    return gate_figure(rows, f"'{style}' digits {digits[0]}..{digits[-1]}, seed {seed}, {steps} DDIM steps: "
                             "pass/reject = quality gate, ✓/✗ = prompt agreement")

