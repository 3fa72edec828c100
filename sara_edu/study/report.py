"""The study's report: ``reports/study.md`` with its tables, figures and what the numbers say.

``python -m sara_edu.study report`` (or :func:`write_report`) reads the CSV that
:mod:`sara_edu.study` appends to and writes the report plus PNG figures next to
it. Everything is computed from the CSV, so the report can be regenerated at any
time, also from a partial (interrupted) study: missing runs show as empty cells.
The pieces live beside this file: which rows (``select``), the statistics
(``stats``), the tables (``tables``), the claims (``claims``), the figures
(``figures``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .claims import claims_table, seeds_text
from .config import CONFIGS, PRETRAINED
from .figures import (
    FIGURES,
    figure_cost,
    figure_sensitivity,
    figure_table1,
    figure_tradeoff,
    save_png,
)
from .samples import samples_section
from .select import (
    LEARNED_AGREEMENT,
    in_phase,
    label,
    learned_styles,
    load_study,
    main_rows,
)
from .stats import style_mean_stats
from .tables import (
    LEGEND,
    LEGEND_FIRST,
    SATURATION,
    ablation_table,
    budget_table,
    controls_table,
    cost_table,
    lr_search_table,
    num,
    paired_table,
    prior_table,
    quality_table,
    retention_table,
    table1,
    where_how_table,
)


#: Budget curves per method, relative to the repository root (``python -m sara_edu.study budget --methods``).
BUDGET_METHODS = Path("reports") / "budget_methods.csv"
#: The controls' curves (elementfire and hornify), shown in the report of the study that has those methods.
BUDGET_CONTROLS = Path("reports") / "budget_controls.csv"


def findings(df: pd.DataFrame) -> list[str]:
    """Plain statements computed from the numbers: rankings by the means (the paired tables judge them)."""
    rows = main_rows(df)
    if len(rows) == 0:
        return ["No finished main-grid runs yet."]
    out = []
    mean_vlhi = style_mean_stats(rows, "vlhi")["mean"].sort_values(ascending=False)
    order = ", ".join(f"{label(m, rows)} {v:.2f}" for m, v in mean_vlhi.items())
    out.append(f"Mean VLHI over styles and seeds, best first: {order}.")
    for col, what, higher in (("fid", "style FID", False), ("agreement", "prompt agreement", True),
                              ("plain_agreement", "retention (plain-prompt agreement)", True),
                              ("unseen_agreement", "generalisation (unseen-digit agreement)", True)):
        st = style_mean_stats(rows, col)["mean"].dropna()
        if len(st):
            top = st.max() if higher else st.min()
            tied = [m for m in st.index if np.isclose(st[m], top, rtol=1e-6, atol=1e-9)]
            names = " = ".join(label(m, rows) for m in tied)
            line = f"Best {what}: {names} ({num(top, 3)})"
            if "sara" in st and "sara" not in tied:  # rank = 1 + how many are clearly better
                better = (st > st["sara"]) if higher else (st < st["sara"])
                better &= ~np.isclose(st, st["sara"], rtol=1e-6, atol=1e-9)
                line += f"; SaRA ranks {int(better.sum()) + 1} of {len(st)} ({num(st['sara'], 3)})"
            out.append(line + ".")
    learned = learned_styles(df)
    if learned:
        per_style = ", ".join(f"{st} {v:.2f}" for st, v in learned.items())
        missing = [st for st, v in learned.items() if v < LEARNED_AGREEMENT]
        out.append(f"Full fine-tuning's style agreement per style (mean over seeds): {per_style}: "
                   + (f"not learned (< {LEARNED_AGREEMENT:g}): {', '.join(missing)}; the paired table below splits "
                      "learned and unlearned styles." if missing else
                      f"every style learned (≥ {LEARNED_AGREEMENT:g})."))
    return out


# --------------------------------------------------------------------------- the report


def _run_time(df: pd.DataFrame) -> str:
    reused = in_phase(df, "reused")
    if reused.any():
        return (f"{_run_time(df[~reused])}; plus {int(reused.sum())} runs copied by run_id from another results "
                "file (`--reuse`: the same run made earlier or by another study; its time was spent there)")
    busy = (df.train_time_s.fillna(0) + df.eval_time_s.fillna(0)).sum()
    done = pd.to_datetime(df.finished_utc, errors="coerce", utc=True)
    starts = done - pd.to_timedelta(df.train_time_s.fillna(0) + df.eval_time_s.fillna(0), unit="s")
    wall = (done.max() - starts.min()).total_seconds() if done.notna().any() else math.nan
    return (f"{len(df)} runs; {busy / 60:.1f} min of run time summed over runs (training + evaluation), "
            f"{wall / 60:.1f} min wall clock from the first run's start to the last run's end "
            f"({done.min():%Y-%m-%d %H:%M} – {done.max():%H:%M} UTC)")


def _floor_text(df: pd.DataFrame) -> str:
    """The FID of real images at the same sample size: what a perfect model would score."""
    floors = df[np.isfinite(df.fid_floor)].groupby("style").fid_floor.first()
    if len(floors) == 0:
        return ""
    return ("For scale, the FID floor (an equally sized set of *real* training images of the style scored the "
            "same way): " + ", ".join(f"{s} {num(v, 3)}" for s, v in floors.items()) + ".")


def completeness_text(df: pd.DataFrame) -> str:
    """How much of the planned main grid has finished (a study cut short is reported as such)."""
    config = CONFIGS.get(df.study.iloc[0])
    if config is None:
        return ""
    done = df[in_phase(df, "main") | in_phase(df, "prior")]
    planned = (len(config.methods) * len(config.styles) + len(config.ablations) * len(config.ablation_styles)
               + len(config.prior_methods) * len(config.prior_styles))
    per_seed = ", ".join(f"seed {s}: {int((done.seed == s).sum())}/{planned}" for s in config.seeds)
    total = len(done)
    if total == planned * len(config.seeds):
        return f"All {total} runs of the main grid finished ({per_seed})."
    return (f"**Incomplete:** {total} of {planned * len(config.seeds)} main-grid runs finished ({per_seed}); "
            "`python -m sara_edu.study run` resumes the rest. Means and spreads use the seeds available per cell.")


def settings_text(df: pd.DataFrame) -> str:
    trained = df[df.method != PRETRAINED]
    first = trained.iloc[0] if len(trained) else df.iloc[0]
    threads = sorted(set(df.threads))
    parts = [f"{int(first.steps)} steps at batch size {int(first.batch_size)} on {int(first.n_train_images)} "
             f"images ({int(first.limit_per_digit)} per digit 0-6) per style",
             f"SaRA/selective fraction {first.fraction:g}" if np.isfinite(first.fraction) else "",
             f"evaluation: {int(first.eval_per_digit)} samples per digit for the style (digits 0-6 and unseen 7-9), "
             f"{int(first.eval_plain_per_digit)} per digit for plain prompts (0-9), {int(first.eval_steps)} DDIM "
             f"steps, guidance {first.guidance_scale:g}",
             f"seeds {sorted(set(main_rows(df).seed)) or sorted(set(df.seed))}",
             f"torch threads per run: {threads}"]
    return "; ".join(p for p in parts if p) + "."


def write_report(csv="reports/study_results.csv", out="reports/study.md", study: str | None = None,
                 notes: str | None = None, root=None) -> Path:
    """Write the markdown report and its figures (next to ``out``); return the report's path.

    ``root``: the folder the claims table reads the benchmark results from (default: the repository).
    """
    from ..io import atomic_write_bytes
    from ..world.paths import REPO_ROOT

    root = Path(REPO_ROOT if root is None else root)

    csv, out = Path(csv), Path(out)
    df = load_study(csv, study)
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for key, make in (("table1", figure_table1), ("tradeoff", figure_tradeoff), ("cost", figure_cost),
                      ("sensitivity", figure_sensitivity)):
        if key == "sensitivity" and not (in_phase(df, "sweep_fraction").any() or in_phase(df, "sweep_lambda").any()):
            continue
        if len(main_rows(df)) == 0 and key != "sensitivity":
            continue
        # named after the report (study_*.png, controls_*.png): two reports in one folder keep their own figures
        made[key] = save_png(make(df), folder / FIGURES[key].replace("study_", f"{out.stem}_", 1)).name
    machines = "; ".join(sorted(set(df.machine)))
    if notes is None:
        config = CONFIGS.get(df.study.iloc[0])
        notes = config.notes if config is not None else ""
    try:
        csv_shown = csv.resolve().relative_to(out.parent.resolve().parent)
    except ValueError:
        csv_shown = csv
    text = [f"# The study: SaRA, its ablations and the baselines on the course model ({df.study.iloc[0]} grid)", "",
            f"Generated by `python -m sara_edu.study report` from `{csv_shown}`; regenerate the data with "
            "`python -m sara_edu.study run` (resumable; `make study` does both).", "",
            f"**Machine:** {machines}.  ", f"**Run time:** {_run_time(df)}.  ",
            f"**Settings:** {settings_text(df)}", "", completeness_text(df), ""]
    if notes:
        text += [notes.strip(), ""]
    others = sorted(p.name for p in {*folder.glob("*.md"), *csv.parent.glob("*.md")}
                    if p.name != out.name and (p.stem in CONFIGS or p.stem == "study"))
    if others:  # the other studies' reports beside this one (e.g. the where-vs-how controls)
        text += ["Other reports of the course's studies: " + ", ".join(f"[{n}]({n})" for n in others) + ".", ""]
    controls = controls_table(df)
    if controls:
        text += ["## Where a method trains, and how", "",
                 "The course's LoRA adapts only the attention projections; SaRA and full fine-tuning train the whole "
                 "UNet. The controls train the same way in the other place (count-matched where they are sparse or "
                 "low-rank), so that each row below changes one thing. Prompt agreement per method (mean ± std over "
                 "seeds of the style average):", "", where_how_table(df), "",
                 f"Paired differences between methods that differ in one thing ({LEGEND_FIRST}):", "",
                 controls, ""] + samples_section((folder, csv.parent), df.study.iloc[0])
    text += ["## What the numbers say", "", "Computed from the tables below.", ""]
    text += [f"- {line}" for line in findings(df)] + [""]
    text += [f"SaRA minus each other method, paired on (style, seed): {LEGEND}", ""]
    learned = learned_styles(df)
    unlearned = [st for st, v in learned.items() if v < LEARNED_AGREEMENT]
    if unlearned:
        rows = main_rows(df)
        for name, keep in (("learned", ~rows["style"].isin(unlearned)), ("unlearned", rows["style"].isin(unlearned))):
            text += [f"Styles full fine-tuning {name}:", "", paired_table(df, rows[keep]), ""]
    else:
        text += [paired_table(df), ""]
    seeds = seeds_text(df)
    if seeds:
        text += [seeds, ""]
    text += ["## The paper's claims, checked", "",
             "Each claim, where the course checks it, and what it shows on the course model (a verdict on this "
             "small model and CPU budget, not on Stable Diffusion).", "", claims_table(df, root), ""]
    text += ["## Table 1: style fit and prompt agreement", "",
             "Rows = methods, column groups = styles (and their mean), each with the FID analogue (↓, Fréchet distance "
             "on the reference classifier's features against held-out images of the style), the prompt agreement "
             "(↑, the CLIP-score analogue: the classifier reads both the prompted digit and the prompted style) and "
             "VLHI (↑, min-max normalised across the methods of one style and seed, as in the paper). "
             "Mean ± std over seeds; best per column in bold.", "", table1(df), "", _floor_text(df), ""]
    if "table1" in made:
        text += [f"![Table 1 as bars]({made['table1']})", ""]
    if not controls:  # a controls report shows the grid beside its first table
        text += samples_section((folder, csv.parent), df.study.iloc[0])
    if "tradeoff" in made:
        text += [f"![Trade-offs]({made['tradeoff']})", ""]
    gate = quality_table(df)
    if gate:
        text += ["## What the samples look like: the quality gate and KID", "",
                 "A classifier names a digit and a look even in coloured noise, so the prompt agreement alone can "
                 "pass images a person would reject. The quality gate (`sara_edu/world/quality.py`) passes a sample "
                 "only if it looks like a real image of the requested look at all (calibrated on held-out data: "
                 "95-98% of real images pass, at most 5% of noisy, pixel-shuffled or blurred ones); the *gated "
                 "agreement* counts a sample only if it passes and the classifier reads its digit and look. The KID "
                 "analogue is the kernel distance on the FID analogue's features, unbiased on a few dozen samples. "
                 "Averages over styles; mean ± std over seeds; the sample grid above shows what they score.",
                 "", gate, ""]
    text += ["## Retention and generalisation", "",
             "Plain prompts (\"a digit k\", digits 0-9) after fine-tuning measure how much of the pretrained skill "
             "survives; *change vs pretrained* is the mean absolute pixel difference from the pretrained model's "
             "samples for the same noise (0 = unchanged). Unseen digits (7-9 in the trained style) measure "
             "generalisation. Averages over styles; mean ± std over seeds.", "", retention_table(df), ""]
    text += ["## Keeping the plain digits: prior preservation", "", prior_table(df), ""]
    text += ["## Ablations: SaRA without the nuclear norm, without progressive adjustment", "", ablation_table(df), ""]
    text += ["## Cost", "", "Peak memory is counted exactly (every tensor created, "
             "`sara_edu.measure.memory.MemoryTracker`) from attaching the method through the first training steps, above "
             "the frozen weights. Step time is the median wall time of a training step on the machine above, "
             "with other jobs running: compare within this table only.", "", cost_table(df), ""]
    if "cost" in made:
        text += [f"![Cost]({made['cost']})", ""]
    text += ["## Learning-rate search", "", lr_search_table(df), ""]
    found = [(f, pd.read_csv(root / f)) for f in (BUDGET_METHODS, BUDGET_CONTROLS) if (root / f).exists()]
    found = [(f, c) for f, c in found if set(c.method) & set(df.method)]  # the curves of this study's methods
    if found:
        curve = pd.concat([c for _, c in found], ignore_index=True)
        budget = int(main_rows(df).steps.max())
        shown = ", ".join(f"`{f.as_posix()}`" for f, _ in found)
        text += ["## Budget per method", "",
                 f"Each method at its chosen rate, one run of {int(curve.step.max())} steps per style (the cosine "
                 f"schedule of that run; {shown}, `python -m sara_edu.study budget "
                 "--methods ...`): prompt agreement on the style (training loss, mean of the 20 steps before) at "
                 f"each point. Saturated at the study's {budget} steps: less than {SATURATION:g} more agreement by "
                 "the last point.", "", budget_table(curve, budget), ""]
    text += ["## Sensitivity: trained fraction (θ) and λ", ""]
    if "sensitivity" in made:
        text += ["SaRA at its chosen learning rate on one style; the θ for each fraction is the |w| quantile it "
                 "implies on the course model. λ = 0 is the no-nuclear-norm ablation.", "",
                 f"![Sensitivity]({made['sensitivity']})", ""]
    else:
        text += ["_No sensitivity sweeps in this study._", ""]
    atomic_write_bytes(out, lambda tmp: Path(tmp).write_text("\n".join(text)))
    return out
