"""The study's tables as markdown: Table 1, retention, cost, the learning-rate search, and the paired
comparisons read with 95% t-intervals and equivalence margins (:mod:`sara_edu.study.stats`)."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from .config import ABLATIONS, CONTROLS, METHOD_LABELS, PRETRAINED, WHERE_HOW
from .select import (
    ablation_rows,
    finished_main,
    in_phase,
    label,
    main_rows,
    methods_in,
)
from .stats import (
    MARGINS_TEXT,
    MARKS,
    Difference,
    margin_for,
    paired,
    paired_series,
    pairs_needed,
    seed_stats,
    style_mean_stats,
    verdict,
)

METRICS = (("fid", "FID↓", False), ("agreement", "Agr↑", True), ("vlhi", "VLHI↑", True))


# --------------------------------------------------------------------------- numbers


def num(x: float, sig: int) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (sig - 1):  # big numbers (FID): whole units, no exponent
        return f"{x:.0f}"
    return f"{x:.{sig}g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def fmt(mean, std=None, digits=3) -> str:
    if mean is None or not np.isfinite(mean):
        return ""
    text = num(mean, digits)
    if std is not None and np.isfinite(std):
        std = 0.0 if std <= 1e-9 * max(abs(mean), 1e-12) else std  # float round-off, not spread
        text += f" ± {num(std, 2)}"
    return text


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def difference_text(d: Difference) -> str:
    """``+0.12 ± 0.03``: the mean difference ± half its 95% t-interval (round-off of identical values shows 0)."""
    scale = d.scale if np.isfinite(d.scale) else 1.0
    mean = 0.0 if abs(d.mean) < 1e-6 * max(scale, 1e-12) else d.mean
    sign = "+" if mean > 0 else "−" if mean < 0 else ""
    h = d.half_width
    h = 0.0 if np.isfinite(h) and h <= 1e-9 * max(abs(d.mean), scale, 1e-12) else h
    spread = f" ± {num(h, 2)}" if np.isfinite(h) else ""
    return f"{sign}{num(abs(mean), 3)}{spread}"


def verdict_cell(d: Difference, col: str, higher_is_better: bool) -> str:
    """``+0.12 ± 0.03 ✓``: the difference, its interval and the verdict's mark (see :data:`LEGEND`)."""
    if d.n == 0 or not np.isfinite(d.mean):
        return ""
    margin = margin_for(col).of(d.scale)
    kind = verdict(d, higher_is_better, margin)
    if not kind:
        return difference_text(d)
    mark = MARKS[kind]
    if kind in ("better", "worse") and max(abs(d.low), abs(d.high)) < margin:
        mark += " (within margin)"
    if kind == "not detectable":
        n = pairs_needed(d, margin)
        mark += f" (~{n} pairs)" if n else " (no size)"
    return f"{difference_text(d)} {mark}"


#: How to read a paired table (the report prints it once, above the first one).
LEGEND = ("mean difference ± half its 95% t-interval over the pairs. ✓ better, ✗ worse: the interval excludes 0 "
          "(\"within margin\": real, but smaller than the margin); = equivalent: the interval lies inside ± the "
          "margin; ? not detectable at this size: the interval holds 0 and reaches past the margin (in brackets, "
          "about how many pairs would settle it if the mean and spread stayed as measured). For FID and loss lower "
          "is better, so a negative difference is good. " + MARGINS_TEXT + ".")
#: The legend's first sentence, for a table that shows the differences without the symbols.
LEGEND_FIRST = LEGEND.split(". ")[0]


# --------------------------------------------------------------------------- Table 1 and its neighbours


def table1(df: pd.DataFrame) -> str:
    """The paper's Table 1 layout: rows = methods, per style FID↓ / Agr↑ / VLHI↑, plus the mean."""
    rows = main_rows(df)
    styles = [s for s in dict.fromkeys(rows["style"])]
    methods = methods_in(rows)
    stats = {c: seed_stats(rows, c) for c, _, _ in METRICS}
    means = {c: style_mean_stats(rows, c) for c, _, _ in METRICS}

    def winners(col: pd.Series, higher: bool) -> set:  # ties are all bold
        col = col.dropna()
        if len(col) == 0:
            return set()
        top = col.max() if higher else col.min()
        return set(col.index[np.isclose(col, top, rtol=1e-9, atol=1e-12)])

    best = {}
    for c, _, higher in METRICS:
        for s in styles:
            best[(c, s)] = winners(stats[c]["mean"].xs(s, level="style"), higher) if len(stats[c]) else set()
        best[(c, "mean")] = winners(means[c]["mean"], higher)
    header = ["method"] + [f"{s}<br>{name}" for s in styles + ["mean"] for _, name, _ in METRICS]
    body = []
    pre = df[(df.method == PRETRAINED) & df["style"].isin(styles) & df.seed.isin(rows.seed.unique())]
    if len(pre):
        cells = [label(PRETRAINED)]
        pstats = {c: seed_stats(pre, c) for c in ("fid", "agreement")}
        pmean = {c: style_mean_stats(pre, c) for c in ("fid", "agreement")}
        for s in styles + ["mean"]:
            for c, _, _ in METRICS:
                if c == "vlhi":
                    cells.append("")
                    continue
                src = pmean[c] if s == "mean" else pstats[c]
                key = PRETRAINED if s == "mean" else (PRETRAINED, s)
                cells.append(fmt(src["mean"].get(key), src["std"].get(key)) if key in src.index else "")
        body.append(cells)
    for m in methods:
        cells = [label(m, rows)]
        for s in styles + ["mean"]:
            for c, _, _ in METRICS:
                src = means[c] if s == "mean" else stats[c]
                key = m if s == "mean" else (m, s)
                if key not in src.index:
                    cells.append("")
                    continue
                text = fmt(src.at[key, "mean"], src.at[key, "std"])
                cells.append(f"**{text}**" if m in best.get((c, s), ()) and text else text)
        body.append(cells)
    return md_table(header, body)


def _style_averaged_table(df: pd.DataFrame, cols) -> str:
    """One row per method (the pretrained model first): each column averaged over styles, mean ± std over seeds."""
    rows = main_rows(df)
    pre = df[(df.method == PRETRAINED) & df["style"].isin(rows["style"].unique()) & df.seed.isin(rows.seed.unique())]
    body = []
    for m, src in [(PRETRAINED, pre)] + [(m, rows) for m in methods_in(rows)]:
        cells = [label(m, rows)]
        for c, _ in cols:
            st = style_mean_stats(src[src.method == m], c)
            cells.append(fmt(st.at[m, "mean"], st.at[m, "std"]) if m in st.index and pd.notna(st.at[m, "mean"]) else "")
        body.append(cells)
    return md_table(["method"] + [name for _, name in cols], body)


def retention_table(df: pd.DataFrame) -> str:
    """Retention (plain prompts) and generalisation (unseen digits), averaged over styles; mean ± std over seeds."""
    return _style_averaged_table(df, [
        ("plain_agreement", "plain prompts: agreement↑"), ("plain_fid", "plain prompts: FID↓"),
        ("plain_drift", "plain samples: change vs pretrained↓"), ("unseen_fid", "unseen digits: FID↓"),
        ("unseen_agreement", "unseen digits: agreement↑"), ("unseen_look_acc", "unseen digits: style↑")])


def quality_table(df: pd.DataFrame) -> str:
    """The quality gate's pass rate, the gated and ungated prompt agreement, and the KID and FID analogues per
    method, averaged over styles (mean ± std over seeds); empty when the runs predate the gate."""
    if not main_rows(df).gate_pass.notna().any():
        return ""
    return _style_averaged_table(df, [
        ("gate_pass", "samples passing the gate↑"), ("agreement", "prompt agreement↑"),
        ("gated_agreement", "gated agreement↑"), ("kid", "style KID↓"), ("fid", "style FID↓")])


def cost_table(df: pd.DataFrame) -> str:
    """Trainable numbers, peak memory above the frozen weights, step time, saved file size, chosen lr."""
    rows = main_rows(df)
    total = None
    full = rows[rows.method == "full"].trainable_params
    if len(full):
        total = float(full.iloc[0])
    body = []
    for m in methods_in(rows):
        r = rows[rows.method == m]
        n = float(r.trainable_params.median())
        share = f" ({100 * n / total:.1f}%)" if total else ""
        body.append([label(m, rows), f"{int(n):,}{share}", fmt(r.peak_memory_mb.mean(), r.peak_memory_mb.std()),
                     fmt(r.step_time_s.median()), fmt(r.file_size_bytes.median() / 1024),
                     ", ".join(f"{v:g}" for v in sorted(r.lr.unique()))])
    return md_table(["method", "trainable numbers", "peak memory above frozen weights (MB)",
                     "median step time (s)", "saved file (KB)", "learning rate"], body)


def lr_search_table(df: pd.DataFrame) -> str:
    from ..world.metrics import vlhi

    search = df[in_phase(df, "lr_search") & (df.prior == 0)]
    if len(search) == 0:
        return "_No learning-rate search in this study (one candidate per method)._"
    chosen = {m: set(main_rows(df).loc[lambda r: r.method == m, "lr"]) for m in METHOD_LABELS}
    pairs = sorted(set(zip(search["style"], search.seed)))
    body, edge = [], []
    for m in methods_in(search):
        r = search[search.method == m]
        lrs = sorted(set(r.lr))
        per_pair = []
        for style, seed in pairs:
            q = r[(r["style"] == style) & (r.seed == seed)].set_index("lr")
            ok = q[(q.status == "ok") & np.isfinite(q.fid) & np.isfinite(q.agreement)]
            per_pair.append((q, dict(zip(ok.index, vlhi(ok.fid.to_numpy(), ok.agreement.to_numpy())))
                             if len(ok) > 1 else {lr: 1.0 for lr in ok.index}))
        for lr in lrs:
            cells = [label(m, search), f"{lr:g}{' ✓' if lr in chosen.get(m, ()) else ''}"]
            for q, _ in per_pair:
                row = q.loc[lr] if lr in q.index else None
                cells.append("" if row is None else "diverged" if row.status != "ok"
                             else f"{fmt(row.fid)} / {fmt(row.agreement)}")
            scores = [sc.get(lr) for _, sc in per_pair]
            cells.append(fmt(float(np.mean(scores))) if all(v is not None for v in scores) else "out")
            body.append(cells)
        if chosen.get(m) and (min(chosen[m]) <= lrs[0] or max(chosen[m]) >= lrs[-1]):
            edge.append(label(m, search))
    edge_text = (f" **The chosen rate is still an edge of the grid for {', '.join(edge)}** (the widening limit was "
                 "reached): the best rate may lie beyond it." if edge else
                 " Every chosen rate has a tried candidate on both sides.")
    where = ", ".join(f"{s} seed {seed}" for s, seed in pairs)
    return (f"Searched on {where}; ✓ = chosen: the best VLHI among the method's own candidates, averaged over the "
            f"pairs (a candidate that diverged on any pair is out).{edge_text}\n\n"
            + md_table(["method", "learning rate", *[f"{s} seed {seed}: FID↓ / Agr↑" for s, seed in pairs],
                        "mean VLHI among candidates↑"], body))


# --------------------------------------------------------------------------- paired comparisons


PAIRED_COLUMNS = (("fid", "style FID↓", False), ("agreement", "prompt agreement↑", True), ("vlhi", "VLHI↑", True),
                  ("plain_agreement", "retention: plain agreement↑", True),
                  ("unseen_agreement", "generalisation: unseen-digit agreement↑", True))


#: Shown beside the paired columns where the study measured them (runs made before they existed have NaN).
LATER_PAIRED_COLUMNS = (("kid", "style KID↓", False), ("gated_agreement", "gated agreement↑", True))


def paired_table(df: pd.DataFrame, rows: pd.DataFrame | None = None, columns=PAIRED_COLUMNS) -> str:
    """SaRA minus each other method, paired on (style, seed): the difference, its interval and the verdict."""
    rows = main_rows(df) if rows is None else rows
    if columns is PAIRED_COLUMNS:
        columns = columns + tuple(c for c in LATER_PAIRED_COLUMNS if rows[c[0]].notna().any())
    present = [m for m in methods_in(rows) if m != "sara"]
    if "sara" not in set(rows.method) or not present:
        return "_SaRA and at least one other method are needed for paired comparisons._"
    body = []
    for other in present:
        n = paired(rows, "sara", other, "fid").n
        body.append([f"SaRA − {label(other, rows)}", str(n)] +
                    [verdict_cell(paired(rows, "sara", other, c), c, hib) for c, _, hib in columns])
    return md_table(["comparison", "pairs"] + [name for _, name, _ in columns], body)


#: The ablations compare near-identical variants: raw metrics only (a VLHI across them would stretch a 2% FID
#: difference to the whole 0-2 range).
ABLATION_COLUMNS = (("fid", "style FID↓", False), ("agreement", "prompt agreement↑", True),
                    ("unseen_fid", "unseen digits: FID↓", False),
                    ("unseen_agreement", "unseen digits: agreement↑", True),
                    ("plain_agreement", "retention: plain agreement↑", True), ("final_loss", "final loss", False))


def ablation_table(df: pd.DataFrame) -> str:
    rows = ablation_rows(df)
    if not set(ABLATIONS) & set(rows.method):
        return "_No ablation runs in this study._"
    styles = ", ".join(sorted(set(rows["style"])))
    return (f"On {styles}; raw paired differences (no VLHI: across near-identical variants its min-max "
            "normalisation turns a small difference into a large one). The final loss is the training loss (mean of "
            "the last 10 steps): lower training loss with worse unseen-digit numbers would be overfitting.\n\n"
            + paired_table(df, rows, ABLATION_COLUMNS))


def prior_table(df: pd.DataFrame) -> str:
    """Each method with and without plain prompts mixed in, paired on (style, seed)."""
    prior = df[in_phase(df, "prior") & (df.status == "ok") & (df.prior == 1)]
    if len(prior) == 0:
        return "_No prior-preservation runs in this study._"
    base = finished_main(df)
    body = []
    cols = (("plain_agreement", "plain prompts: agreement↑", True), ("plain_drift", "plain samples: change↓", False),
            ("agreement", "style: prompt agreement↑", True), ("fid", "style: FID↓", False))
    for m in methods_in(prior):
        with_p = prior[prior.method == m].set_index(["style", "seed"])
        without = base[base.method == m].set_index(["style", "seed"]).reindex(with_p.index)
        cells = [label(m), str(int(without.fid.notna().sum()))]
        for c, _, hib in cols:
            d = paired_series(with_p[c], without[c])
            cells.append(f"{fmt(without[c].mean())} → {fmt(with_p[c].mean())} ({verdict_cell(d, c, hib)})")
        body.append(cells)
    styles = ", ".join(sorted(set(prior["style"])))
    return (f"On {styles}: the style set alone → the style set with plain digits mixed in (a third of the "
            "mixed set), same learning rate, mean over seeds; in brackets the paired difference (with − without), "
            "read as the paired tables above (✓ mixing helps, ✗ it hurts).\n\n"
            + md_table(["method", "pairs"] + [name for _, name, _ in cols], body))


# --------------------------------------------------------------------------- where a method trains vs how


WHERES = ("attention", "everywhere")
HOWS = ("sparse", "low-rank", "dense")


def where_how_table(df: pd.DataFrame, col: str = "agreement") -> str:
    """The methods as a 2 x 3 grid (where: attention projections / the whole UNet; how: sparse / low-rank /
    dense), each cell the method's ``col`` (mean ± std over seeds of the style average)."""
    rows = main_rows(df)
    present = [m for m in methods_in(rows) if m in WHERE_HOW]
    if not set(CONTROLS) & set(present):
        return "_This study has no controls that train the same way in another place._"
    st = style_mean_stats(rows, col)
    body = []
    for where in WHERES:
        cells = [where]
        for how in HOWS:
            here = [m for m in present if WHERE_HOW[m] == (where, how)]
            cells.append("<br>".join(f"{label(m, rows)}: {fmt(st.at[m, 'mean'], st.at[m, 'std'])}" for m in here))
        body.append(cells)
    return md_table(["where \\ how", *HOWS], body)


def one_difference_pairs(methods) -> list[tuple[str, str, str]]:
    """``(a, b, what a − b isolates)`` for every two methods that differ in exactly one of where / how."""
    out = []
    for a, b in itertools.combinations([m for m in methods if m in WHERE_HOW], 2):
        (wa, ha), (wb, hb) = WHERE_HOW[a], WHERE_HOW[b]
        if wa == wb and ha != hb:
            out.append((a, b, f"how ({ha} vs {hb}), both {wa}"))
        elif ha == hb and wa != wb:
            out.append((a, b, f"where ({wa} vs {wb}), both {ha}"))
    return out


def controls_table(df: pd.DataFrame, columns=PAIRED_COLUMNS[:2]) -> str:
    """Paired differences between methods that differ in one thing only, each read as the paired tables."""
    rows = main_rows(df)
    pairs = one_difference_pairs(methods_in(rows))
    if not pairs or not set(CONTROLS) & set(methods_in(rows)):
        return ""
    body = []
    for a, b, what in pairs:
        n = paired(rows, a, b, columns[0][0]).n
        body.append([f"{label(a, rows)} − {label(b, rows)}", what, str(n)] +
                    [verdict_cell(paired(rows, a, b, c), c, hib) for c, _, hib in columns])
    return md_table(["comparison", "isolates", "pairs"] + [name for _, name, _ in columns], body)


# --------------------------------------------------------------------------- budget per method

#: A method has saturated at the budget when its agreement gains less than this after it (the agreement margin).
SATURATION = 0.05


def budget_table(curve: pd.DataFrame, budget: int) -> str:
    """Per method and style: prompt agreement (and training loss) along one long run, and whether the
    method had saturated at ``budget`` (it gains less than :data:`SATURATION` by the longest point)."""
    if len(curve) == 0:
        return ""
    steps = sorted(set(curve.step))
    body = []
    for (method, style), g in curve.groupby(["method", "style"], sort=False):
        g = g.set_index("step")
        cells = [label(method), style, f"{g.lr.iloc[0]:g}"]
        cells += [f"{g.at[s, 'agreement']:.2f} ({g.at[s, 'loss']:.3f})" if s in g.index else "" for s in steps]
        if budget in g.index and steps[-1] > budget:
            gain = g.at[steps[-1], "agreement"] - g.at[budget, "agreement"]
            cells.append(f"{'yes' if gain < SATURATION else 'no'} ({gain:+.2f} by step {steps[-1]})")
        else:
            cells.append("")
        body.append(cells)
    return md_table(["method", "style", "lr", *[f"step {s}" for s in steps], f"saturated at {budget}?"], body)
