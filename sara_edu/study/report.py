"""The study's report: tables in the paper's layout, figures, and what the numbers say.

``python -m sara_edu.study report`` (or :func:`write_report`) reads the CSV that
:mod:`sara_edu.study` appends to and writes ``reports/study.md`` plus PNG
figures next to it. Everything is computed from the CSV, so the report can be
regenerated at any time, also from a partial (interrupted) study: missing runs
show as empty cells.

VLHI is relative (a min-max normalisation across the compared methods), so it
is computed the way the paper does it, across the fine-tuning methods of one
column of Table 1: here one style *and one seed*; the table then shows its
mean and spread over seeds. The pretrained model is a reference row and takes
no part in the normalisation.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from .config import ABLATIONS, METHOD_LABELS, PRETRAINED, read_results

FIGURES = {"table1": "study_table1.png", "tradeoff": "study_tradeoff.png", "cost": "study_cost.png",
           "sensitivity": "study_sensitivity.png"}
_METRICS = (("fid", "FID↓", False), ("agreement", "Agr↑", True), ("vlhi", "VLHI↑", True))


# --------------------------------------------------------------------------- selecting rows


def load_study(csv, study: str | None = None) -> pd.DataFrame:
    """The rows of one study from the CSV (the only study in it, or the one named)."""
    df = read_results(csv)
    if len(df) == 0:
        raise DataError(f"{csv} has no results yet: run `python -m sara_edu.study run` first")
    names = sorted(df.study.unique())
    if study is None:
        if len(names) > 1:
            raise ConfigError(f"{csv} holds several studies {names}; pass study=... (--study) to pick one")
        study = names[0]
    if study not in names:
        raise ConfigError(f"{csv} has no study {study!r}; it has {names}")
    return df[df.study == study].reset_index(drop=True)


def _in_phase(df: pd.DataFrame, phase: str) -> pd.Series:
    return df.phase.str.split("+").apply(lambda ps: phase in ps)


def _with_vlhi(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with VLHI computed per (style, seed) across the methods in them."""
    from ..world.metrics import vlhi

    rows = rows.copy()
    rows["vlhi"] = np.nan
    for _, group in rows.groupby(["style", "seed"]):
        ok = group[np.isfinite(group.fid) & np.isfinite(group.agreement)]
        if len(ok) > 1:
            rows.loc[ok.index, "vlhi"] = vlhi(ok.fid.to_numpy(), ok.agreement.to_numpy())
    return rows


def _finished_main(df: pd.DataFrame) -> pd.DataFrame:
    return df[_in_phase(df, "main") & (df.status == "ok") & (df.prior == 0)]


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Finished main-grid runs of the compared methods (not the ablations), VLHI per (style, seed) across them."""
    rows = _finished_main(df)
    return _with_vlhi(rows[~rows.method.isin(ABLATIONS)])


def ablation_rows(df: pd.DataFrame) -> pd.DataFrame:
    """SaRA and its ablations on the styles the ablations ran on; VLHI across these three per (style, seed)."""
    rows = _finished_main(df)
    styles = set(rows.loc[rows.method.isin(ABLATIONS), "style"])
    return _with_vlhi(rows[rows.method.isin(("sara", *ABLATIONS)) & rows["style"].isin(styles)])


#: Full fine-tuning's style agreement from which a style counts as learned in the budget.
LEARNED_AGREEMENT = 0.8


def learned_styles(df: pd.DataFrame) -> dict[str, float]:
    """Full fine-tuning's style agreement per style (mean over seeds); learned: >= :data:`LEARNED_AGREEMENT`."""
    rows = main_rows(df)
    full = rows[rows.method == "full"]
    return {s: float(v) for s, v in full.groupby("style").agreement.mean().items()} if len(full) else {}


def _methods(rows: pd.DataFrame) -> list[str]:
    return [m for m in METHOD_LABELS if m in set(rows.method)]


def _label(method: str, rows: pd.DataFrame | None = None) -> str:
    if method == PRETRAINED:
        return "pretrained (no fine-tuning)"
    label = METHOD_LABELS.get(method, method)
    if method == "lora_matched" and rows is not None:
        ranks = sorted(set(rows.loc[rows.method == method, "lora_rank"]))
        if ranks:
            label = f"LoRA r={ranks[0]} (rank-matched)"
    return label


# --------------------------------------------------------------------------- numbers


def _num(x: float, sig: int) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (sig - 1):  # big numbers (FID): whole units, no exponent
        return f"{x:.0f}"
    return f"{x:.{sig}g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def _fmt(mean, std=None, digits=3) -> str:
    if mean is None or not np.isfinite(mean):
        return ""
    text = _num(mean, digits)
    if std is not None and np.isfinite(std):
        std = 0.0 if std <= 1e-9 * max(abs(mean), 1e-12) else std  # float round-off, not spread
        text += f" ± {_num(std, 2)}"
    return text


def seed_stats(rows: pd.DataFrame, col: str, by=("method", "style")) -> pd.DataFrame:
    """Mean and standard deviation over seeds of ``col`` per ``by`` group (+ count)."""
    g = rows.groupby(list(by))[col]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})


def style_mean_stats(rows: pd.DataFrame, col: str) -> pd.DataFrame:
    """Per method: average over styles within each seed, then mean and std over seeds."""
    per_seed = rows.groupby(["method", "seed"])[col].mean()
    g = per_seed.groupby("method")
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})


def paired(rows: pd.DataFrame, a: str, b: str, col: str) -> dict:
    """``a - b`` of ``col`` paired on (style, seed): mean, standard error, count, how often a > b."""
    pa = rows[rows.method == a].set_index(["style", "seed"])[col]
    pb = rows[rows.method == b].set_index(["style", "seed"])[col]
    return paired_series(pa, pb)


def paired_series(pa: pd.Series, pb: pd.Series) -> dict:
    """``pa - pb`` over their common index: mean, standard error, count, how often a > b, and b's scale."""
    d = (pa - pb).dropna()
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": float(d.mean()) if n else math.nan, "se": se, "n": n, "a_higher": int((d > 0).sum()),
            "scale": float(pb.abs().mean()) if len(pb) else math.nan}


# --------------------------------------------------------------------------- tables


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def table1(df: pd.DataFrame) -> str:
    """The paper's Table 1 layout: rows = methods, per style FID↓ / Agr↑ / VLHI↑, plus the mean."""
    rows = main_rows(df)
    styles = [s for s in dict.fromkeys(rows["style"])]
    methods = _methods(rows)
    stats = {c: seed_stats(rows, c) for c, _, _ in _METRICS}
    means = {c: style_mean_stats(rows, c) for c, _, _ in _METRICS}
    def winners(col: pd.Series, higher: bool) -> set:  # ties are all bold
        col = col.dropna()
        if len(col) == 0:
            return set()
        top = col.max() if higher else col.min()
        return set(col.index[np.isclose(col, top, rtol=1e-9, atol=1e-12)])

    best = {}
    for c, _, higher in _METRICS:
        for s in styles:
            best[(c, s)] = winners(stats[c]["mean"].xs(s, level="style"), higher) if len(stats[c]) else set()
        best[(c, "mean")] = winners(means[c]["mean"], higher)
    header = ["method"] + [f"{s}<br>{name}" for s in styles + ["mean"] for _, name, _ in _METRICS]
    body = []
    pre = df[(df.method == PRETRAINED) & df["style"].isin(styles) & df.seed.isin(rows.seed.unique())]
    if len(pre):
        cells = [_label(PRETRAINED)]
        pstats = {c: seed_stats(pre, c) for c in ("fid", "agreement")}
        pmean = {c: style_mean_stats(pre, c) for c in ("fid", "agreement")}
        for s in styles + ["mean"]:
            for c, _, _ in _METRICS:
                if c == "vlhi":
                    cells.append("")
                    continue
                src = pmean[c] if s == "mean" else pstats[c]
                key = PRETRAINED if s == "mean" else (PRETRAINED, s)
                cells.append(_fmt(src["mean"].get(key), src["std"].get(key)) if key in src.index else "")
        body.append(cells)
    for m in methods:
        cells = [_label(m, rows)]
        for s in styles + ["mean"]:
            for c, _, _ in _METRICS:
                src = means[c] if s == "mean" else stats[c]
                key = m if s == "mean" else (m, s)
                if key not in src.index:
                    cells.append("")
                    continue
                text = _fmt(src.at[key, "mean"], src.at[key, "std"])
                cells.append(f"**{text}**" if m in best.get((c, s), ()) and text else text)
        body.append(cells)
    return _md_table(header, body)


def retention_table(df: pd.DataFrame) -> str:
    """Retention (plain prompts) and generalisation (unseen digits), averaged over styles; mean ± std over seeds."""
    rows = main_rows(df)
    pre = df[(df.method == PRETRAINED) & df["style"].isin(rows["style"].unique()) & df.seed.isin(rows.seed.unique())]
    cols = [("plain_agreement", "plain prompts: agreement↑"), ("plain_fid", "plain prompts: FID↓"),
            ("plain_drift", "plain samples: change vs pretrained↓"), ("unseen_fid", "unseen digits: FID↓"),
            ("unseen_agreement", "unseen digits: agreement↑"), ("unseen_look_acc", "unseen digits: style↑")]
    body = []
    for m, src in [(PRETRAINED, pre)] + [(m, rows) for m in _methods(rows)]:
        cells = [_label(m, rows)]
        for c, _ in cols:
            st = style_mean_stats(src[src.method == m], c)
            cells.append(_fmt(st.at[m, "mean"], st.at[m, "std"]) if m in st.index else "")
        body.append(cells)
    return _md_table(["method"] + [name for _, name in cols], body)


def cost_table(df: pd.DataFrame) -> str:
    """Trainable numbers, peak memory above the frozen weights, step time, saved file size, chosen lr."""
    rows = main_rows(df)
    total = None
    full = rows[rows.method == "full"].trainable_params
    if len(full):
        total = float(full.iloc[0])
    body = []
    for m in _methods(rows):
        r = rows[rows.method == m]
        n = float(r.trainable_params.median())
        share = f" ({100 * n / total:.1f}%)" if total else ""
        body.append([_label(m, rows), f"{int(n):,}{share}", _fmt(r.peak_memory_mb.mean(), r.peak_memory_mb.std()),
                     _fmt(r.step_time_s.median()), _fmt(r.file_size_bytes.median() / 1024),
                     ", ".join(f"{v:g}" for v in sorted(r.lr.unique()))])
    return _md_table(["method", "trainable numbers", "peak memory above frozen weights (MB)",
                      "median step time (s)", "saved file (KB)", "learning rate"], body)


def lr_search_table(df: pd.DataFrame) -> str:
    from ..world.metrics import vlhi

    search = df[_in_phase(df, "lr_search") & (df.prior == 0)]
    if len(search) == 0:
        return "_No learning-rate search in this study (one candidate per method)._"
    chosen = {m: set(main_rows(df).loc[lambda r: r.method == m, "lr"]) for m in METHOD_LABELS}
    pairs = sorted(set(zip(search["style"], search.seed)))
    body, edge = [], []
    for m in _methods(search):
        r = search[search.method == m]
        lrs = sorted(set(r.lr))
        per_pair = []
        for style, seed in pairs:
            q = r[(r["style"] == style) & (r.seed == seed)].set_index("lr")
            ok = q[(q.status == "ok") & np.isfinite(q.fid) & np.isfinite(q.agreement)]
            per_pair.append((q, dict(zip(ok.index, vlhi(ok.fid.to_numpy(), ok.agreement.to_numpy())))
                             if len(ok) > 1 else {lr: 1.0 for lr in ok.index}))
        for lr in lrs:
            cells = [_label(m, search), f"{lr:g}{' ✓' if lr in chosen.get(m, ()) else ''}"]
            for q, _ in per_pair:
                row = q.loc[lr] if lr in q.index else None
                cells.append("" if row is None else "diverged" if row.status != "ok"
                             else f"{_fmt(row.fid)} / {_fmt(row.agreement)}")
            scores = [sc.get(lr) for _, sc in per_pair]
            cells.append(_fmt(float(np.mean(scores))) if all(v is not None for v in scores) else "out")
            body.append(cells)
        if chosen.get(m) and (min(chosen[m]) <= lrs[0] or max(chosen[m]) >= lrs[-1]):
            edge.append(_label(m, search))
    edge_text = (f" **The chosen rate is still an edge of the grid for {', '.join(edge)}** (the widening limit was "
                 "reached): the best rate may lie beyond it." if edge else
                 " Every chosen rate has a tried candidate on both sides.")
    where = ", ".join(f"{s} seed {seed}" for s, seed in pairs)
    return (f"Searched on {where}; ✓ = chosen: the best VLHI among the method's own candidates, averaged over the "
            f"pairs (a candidate that diverged on any pair is out).{edge_text}\n\n"
            + _md_table(["method", "learning rate", *[f"{s} seed {seed}: FID↓ / Agr↑" for s, seed in pairs],
                         "mean VLHI among candidates↑"], body))


# --------------------------------------------------------------------------- findings


_PAIRED_COLUMNS = (("fid", "style FID↓", False), ("agreement", "prompt agreement↑", True), ("vlhi", "VLHI↑", True),
                   ("plain_agreement", "retention: plain agreement↑", True),
                   ("unseen_agreement", "generalisation: unseen-digit agreement↑", True))


def _clear(p: dict) -> bool:
    """A difference larger than 2 standard errors."""
    return bool(np.isfinite(p["se"]) and abs(p["mean"]) > 2 * p["se"])


def _signed(p: dict) -> str:
    """``+0.12 ± 0.03``: the mean difference with its standard error (round-off of identical values shows 0)."""
    mean = 0.0 if abs(p["mean"]) < 1e-6 * max(p.get("scale", 1.0), 1e-12) else p["mean"]
    sign = "+" if mean > 0 else "−" if mean < 0 else ""
    spread = f" ± {_num(p['se'], 2)}" if np.isfinite(p["se"]) else ""
    return f"{sign}{_num(abs(mean), 3)}{spread}"


def _verdict(p: dict, higher_is_better: bool) -> str:
    """``+0.12 ± 0.03 ✓`` (SaRA clearly better), ``✗`` (clearly worse) or ``≈`` (within 2 standard errors).

    A clear difference smaller than 2% of the compared method's mean gets "(tiny)": consistent, but
    too small to matter.
    """
    if p["n"] == 0 or not np.isfinite(p["mean"]):
        return ""
    if not _clear(p):
        mark = "≈"
    else:
        mark = "✓" if (p["mean"] > 0) == higher_is_better else "✗"
        if np.isfinite(p.get("scale", np.nan)) and abs(p["mean"]) < 0.02 * p["scale"]:
            mark += " (tiny)"
    return f"{_signed(p)} {mark}"


def paired_table(df: pd.DataFrame, rows: pd.DataFrame | None = None, columns=_PAIRED_COLUMNS) -> str:
    """SaRA minus each other method, paired on (style, seed): mean ± standard error, and a verdict."""
    rows = main_rows(df) if rows is None else rows
    present = [m for m in _methods(rows) if m != "sara"]
    if "sara" not in set(rows.method) or not present:
        return "_SaRA and at least one other method are needed for paired comparisons._"
    body = []
    for other in present:
        n = paired(rows, "sara", other, "fid")["n"]
        body.append([f"SaRA − {_label(other, rows)}", str(n)] +
                    [_verdict(paired(rows, "sara", other, c), hib) for c, _, hib in columns])
    return _md_table(["comparison", "pairs"] + [name for _, name, _ in columns], body)


_ABLATION_COLUMNS = (("fid", "style FID↓", False), ("agreement", "prompt agreement↑", True), ("vlhi", "VLHI↑", True),
                     ("unseen_fid", "unseen digits: FID↓", False),
                     ("unseen_agreement", "unseen digits: agreement↑", True),
                     ("plain_agreement", "retention: plain agreement↑", True), ("final_loss", "final loss", False))


def ablation_table(df: pd.DataFrame) -> str:
    rows = ablation_rows(df)
    if not set(ABLATIONS) & set(rows.method):
        return "_No ablation runs in this study._"
    styles = ", ".join(sorted(set(rows["style"])))
    return (f"On {styles}; VLHI across SaRA and its two ablations. The final loss is the training loss (mean of the "
            "last 10 steps): lower training loss with worse unseen-digit numbers would be overfitting.\n\n"
            + paired_table(df, rows, _ABLATION_COLUMNS))


def prior_table(df: pd.DataFrame) -> str:
    """Each method with and without plain prompts mixed in, paired on (style, seed)."""
    prior = df[_in_phase(df, "prior") & (df.status == "ok") & (df.prior == 1)]
    if len(prior) == 0:
        return "_No prior-preservation runs in this study._"
    base = _finished_main(df)
    body = []
    cols = (("plain_agreement", "plain prompts: agreement↑", True), ("plain_drift", "plain samples: change↓", False),
            ("agreement", "style: prompt agreement↑", True), ("fid", "style: FID↓", False))
    for m in _methods(prior):
        with_p = prior[prior.method == m].set_index(["style", "seed"])
        without = base[base.method == m].set_index(["style", "seed"]).reindex(with_p.index)
        cells = [_label(m), str(int(without.fid.notna().sum()))]
        for c, _, hib in cols:
            p = paired_series(with_p[c], without[c])
            cells.append(f"{_fmt(without[c].mean())} → {_fmt(with_p[c].mean())} ({_verdict(p, hib)})")
        body.append(cells)
    styles = ", ".join(sorted(set(prior["style"])))
    return (f"On {styles}: the style set alone → the style set with plain digits mixed in (a third of the "
            "mixed set), same learning rate, mean over seeds; in brackets the paired difference ± standard error "
            "(✓ mixing clearly helps, ✗ clearly hurts, ≈ within 2 standard errors).\n\n"
            + _md_table(["method", "pairs"] + [name for _, name, _ in cols], body))


def findings(df: pd.DataFrame) -> list[str]:
    """Plain statements computed from the numbers (no judgement beyond 'more than 2 standard errors')."""
    rows = main_rows(df)
    if len(rows) == 0:
        return ["No finished main-grid runs yet."]
    out = []
    mean_vlhi = style_mean_stats(rows, "vlhi")["mean"].sort_values(ascending=False)
    order = ", ".join(f"{_label(m, rows)} {v:.2f}" for m, v in mean_vlhi.items())
    out.append(f"Mean VLHI over styles and seeds, best first: {order}.")
    for col, what, higher in (("fid", "style FID", False), ("agreement", "prompt agreement", True),
                              ("plain_agreement", "retention (plain-prompt agreement)", True),
                              ("unseen_agreement", "generalisation (unseen-digit agreement)", True)):
        st = style_mean_stats(rows, col)["mean"].dropna()
        if len(st):
            top = st.max() if higher else st.min()
            tied = [m for m in st.index if np.isclose(st[m], top, rtol=1e-6, atol=1e-9)]
            names = " = ".join(_label(m, rows) for m in tied)
            line = f"Best {what}: {names} ({_num(top, 3)})"
            if "sara" in st and "sara" not in tied:  # rank = 1 + how many are clearly better
                better = (st > st["sara"]) if higher else (st < st["sara"])
                better &= ~np.isclose(st, st["sara"], rtol=1e-6, atol=1e-9)
                line += f"; SaRA ranks {int(better.sum()) + 1} of {len(st)} ({_num(st['sara'], 3)})"
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


# --------------------------------------------------------------------------- the paper's claims

#: Where the other facts come from (both relative to the repository root).
CLAIMS_INPUTS = Path("reports") / "claims_inputs.csv"  # benchmarks/paper_claims.py
MEMORY_TABLE = Path("benchmarks") / "results" / "memory_time_cpu_sd15.csv"  # benchmarks/memory_time.py --models sd15


def _claim_verdict(p: dict, higher_is_better: bool) -> str:
    if p["n"] == 0 or not np.isfinite(p["mean"]):
        return "not testable here (no runs)"
    if not _clear(p):
        return "did not hold (no clear difference)"
    return "held" if (p["mean"] > 0) == higher_is_better else "did not hold (the opposite)"


def _kept_verdict(p: dict) -> str:
    """For "matches or beats" / "is kept" claims: held unless SaRA is clearly worse (higher is better)."""
    return "held" if p["n"] and (p["mean"] >= 0 or not _clear(p)) else _claim_verdict(p, True)


def _paired_text(p: dict) -> str:
    return f"{_signed(p)} over {p['n']} (style, seed) pairs" if p["n"] else ""


def claims_rows(df: pd.DataFrame, root: Path) -> list[list[str]]:
    """The paper's claims -> [claim, where the course checks it, verdict, the number]."""
    rows, abl = main_rows(df), ablation_rows(df)
    out = []
    facts = {}
    if (root / CLAIMS_INPUTS).exists():
        f = pd.read_csv(root / CLAIMS_INPUTS)
        facts = {(r.claim, r.measure): float(r.value) for r in f.itertuples()}
    if ("zeroing", "fid_at_0") in facts:
        fid0, ag0 = facts[("zeroing", "fid_at_0")], facts[("zeroing", "agreement_at_0")]
        held = [pct for pct in (10, 15, 20) if ("zeroing", f"fid_at_{pct}") in facts
                and facts[("zeroing", f"fid_at_{pct}")] <= 1.15 * fid0
                and facts[("zeroing", f"agreement_at_{pct}")] >= ag0 - 0.05]
        number = "; ".join(f"{pct}%: FID {_num(facts[('zeroing', f'fid_at_{pct}')], 3)}, agreement "
                           f"{facts[('zeroing', f'agreement_at_{pct}')]:.2f}" for pct in (0, 10, 15, 20)
                           if ("zeroing", f"fid_at_{pct}") in facts)
        verdict = ("held up to 20%" if 20 in held else f"held up to {max(held)}%, not at 20%" if held
                   else "did not hold")
        out.append(["The smallest 10-20% of the weights can be zeroed with little change",
                    "notebook 02; `benchmarks/paper_claims.py`",
                    f"{verdict} (little = FID within +15%, agreement within 0.05)", number])
    else:
        out.append(["The smallest 10-20% of the weights can be zeroed with little change", "notebook 02",
                    "not measured yet", "run `python benchmarks/paper_claims.py`"])
    if ("temporarily_ineffective", "retained_from_first") in facts:
        kept = facts[("temporarily_ineffective", "retained_from_first")]
        above = facts[("temporarily_ineffective", "share_above_median")]
        low = facts[("temporarily_ineffective", "share_below_30th")]
        step = int(facts[("temporarily_ineffective", "first_checkpoint_step")])
        total = int(facts[("temporarily_ineffective", "total_steps")])
        out.append(["Small weights are only temporarily ineffective",
                    "notebook 01; `benchmarks/paper_claims.py`",
                    "partly held: most leave the smallest 10%, but few become large" if kept < 0.5 and above < 0.3
                    else "held" if kept < 0.5 else "did not hold",
                    f"of the smallest 10% at pretraining step {step} of {total}, {100 * kept:.0f}% are still in the "
                    f"smallest 10% at the end (chance 10%), {100 * low:.0f}% in the smallest 30%, "
                    f"{100 * above:.0f}% above the median"])
    lora = "lora_matched" if "lora_matched" in set(rows.method) else "lora_r4"
    for col, what, hib in (("fid", "the FID analogue", False), ("agreement", "prompt agreement (CLIP-score analogue)",
                                                                   True), ("vlhi", "VLHI", True)):
        p = paired(rows, "sara", lora, col)
        out.append([f"SaRA beats LoRA on {what}", "this study (Table 1, paired table)", _claim_verdict(p, hib),
                    f"SaRA − {_label(lora, rows)}: " + _paired_text(p)])
    p = paired(rows, "sara", "full", "vlhi")
    out.append(["SaRA matches or beats full fine-tuning (VLHI)", "this study", _kept_verdict(p),
                "SaRA − full fine-tuning: " + _paired_text(p)])
    p = paired(abl, "sara", "sara_no_nuclear", "unseen_agreement")
    q = paired(abl, "sara", "sara_no_nuclear", "unseen_fid")
    out.append(["The nuclear-norm term reduces overfitting", "this study (ablations)",
                _claim_verdict(p, True) if p["n"] else "not testable here (no runs)",
                f"unseen-digit agreement {_paired_text(p)}; unseen-digit FID {_paired_text(q)}"])
    p = paired(abl, "sara", "sara_no_progressive", "vlhi")
    out.append(["Progressive adjustment helps", "this study (ablations)", _claim_verdict(p, True),
                "SaRA − SaRA without it, VLHI: " + _paired_text(p)])
    mem = root / MEMORY_TABLE
    if mem.exists():
        t = pd.read_csv(mem).set_index("key")
        col = "tracker peak above frozen (MB)"

        def ratio(a, b, c=col):
            return float(t.at[a, c] / t.at[b, c]) if {a, b} <= set(t.index) else math.nan

        key = "lora-matched" if "lora-matched" in t.index else "lora4"
        sel, vs_lora = ratio("sara", "selective"), ratio("sara", key)
        lora_name = t.at[key, "method"] if key in t.index else "LoRA"
        out.append(["Unstructured backpropagation saves memory against selective fine-tuning",
                    "`benchmarks/memory_time.py` (SD-1.5-sized UNet, CPU)",
                    "held" if sel < 1 else "did not hold" if np.isfinite(sel) else "not measured",
                    f"SaRA's tracker peak is {sel:.2f}x selective fine-tuning's (10% of the entries)"])
        out.append(["SaRA needs less training memory than LoRA", "`benchmarks/memory_time.py`",
                    "not measured" if not np.isfinite(vs_lora) else "did not hold" if vs_lora > 1 else "held",
                    f"SaRA's tracker peak is {vs_lora:.2f}x that of {lora_name}; the paper's own figure (GPU, its "
                    "budgets) is not reproduced here"])
    out.append(["One line of code to use", "`tests/sara/scripts/accelerate_sara.py` (the diffusers loop, only the "
                "optimizer line changed, 1 and 2 processes)", "held", "one changed line"])
    for other in ("full", lora):
        p = paired(rows, "sara", other, "unseen_agreement")
        out.append([f"Generalisation to unseen prompts is kept (vs {_label(other, rows)})",
                    "this study (retention and generalisation)", _kept_verdict(p),
                    "unseen-digit agreement, SaRA − it: " + _paired_text(p)])
    pre = df[(df.method == PRETRAINED)]
    if len(pre) and "sara" in set(rows.method):
        before = float(pre.plain_agreement.mean())
        after = float(rows.loc[rows.method == "sara", "plain_agreement"].mean())
        out.append(["The pretrained model's knowledge is kept (plain prompts)", "this study (retention)",
                    "held" if after >= before - 0.1 else "did not hold",
                    f"plain-prompt agreement {before:.2f} before, {after:.2f} after SaRA"])
    return out


CLAIMS_COLUMNS = ["the paper's claim", "where the course checks it", "verdict", "number"]


def claims_table(df: pd.DataFrame, root: Path) -> str:
    return _md_table(CLAIMS_COLUMNS, claims_rows(df, root))


# --------------------------------------------------------------------------- figures


def _figure(**kw):
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, works in notebooks and headless
    )

    return Figure(**kw)


def _save(fig, path: Path) -> Path:
    from ..io import atomic_write_bytes

    return atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _colors(methods):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i) for i, m in enumerate(METHOD_LABELS) if m in methods}


def figure_table1(df: pd.DataFrame):
    """Grouped bars: FID, agreement and VLHI per style (and the mean), one bar per method, error = std over seeds."""
    rows = main_rows(df)
    styles = list(dict.fromkeys(rows["style"])) + ["mean"]
    methods = _methods(rows)
    colors = _colors(methods)
    fig = _figure(figsize=(13, 8.5))
    axes = fig.subplots(3, 1, sharex=True)
    width = 0.8 / max(len(methods), 1)
    for ax, (c, name, _) in zip(axes, _METRICS):
        st, mean = seed_stats(rows, c), style_mean_stats(rows, c)
        for i, m in enumerate(methods):
            ys = [mean.at[m, "mean"] if s == "mean" else st["mean"].get((m, s), np.nan) for s in styles]
            es = [mean.at[m, "std"] if s == "mean" else st["std"].get((m, s), np.nan) for s in styles]
            ax.bar(np.arange(len(styles)) + (i - (len(methods) - 1) / 2) * width, ys, width, yerr=es, capsize=2,
                   color=colors[m], label=_label(m, rows))
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
    methods = _methods(rows)
    colors = _colors(methods)
    fig = _figure(figsize=(12, 4.8))
    ax1, ax2 = fig.subplots(1, 2)
    for m in methods:
        r = rows[rows.method == m]
        per_seed = r.groupby("seed")[["fid", "agreement", "plain_agreement"]].mean()
        kw = dict(color=colors[m], capsize=3, marker="o", label=_label(m, rows))
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
    methods = _methods(rows)
    colors = _colors(methods)
    fig = _figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, (col, name, scale) in zip(axes, (("trainable_params", "trainable numbers", 1),
                                             ("peak_memory_mb", "peak memory above frozen (MB)", 1),
                                             ("step_time_s", "median step time (s)", 1),
                                             ("file_size_bytes", "saved file (KB)", 1 / 1024))):
        vals = [rows.loc[rows.method == m, col].median() * scale for m in methods]
        ax.bar(range(len(methods)), vals, color=[colors[m] for m in methods])
        ax.set_xticks(range(len(methods)), [_label(m, rows) for m in methods], rotation=60, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        if col in ("trainable_params", "file_size_bytes"):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Cost per method (median over runs)")
    return fig


def _sweep(df: pd.DataFrame, phase: str, col: str) -> pd.DataFrame:
    rows = df[_in_phase(df, phase) & (df.status == "ok")]
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
        style = df.loc[_in_phase(df, phase), "style"].iloc[0]
        axes[0, j].set_title(f"SaRA vs {title}\n({int(s.n.max())} seed(s), style {style})", fontsize=10)
    return fig


# --------------------------------------------------------------------------- the report


def _run_time(df: pd.DataFrame) -> str:
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
            "same way): " + ", ".join(f"{s} {_num(v, 3)}" for s, v in floors.items()) + ".")


def completeness_text(df: pd.DataFrame) -> str:
    """How much of the planned main grid has finished (a study cut short is reported as such)."""
    from .config import CONFIGS

    config = CONFIGS.get(df.study.iloc[0])
    if config is None:
        return ""
    done = df[_in_phase(df, "main") | _in_phase(df, "prior")]
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
        if key == "sensitivity" and not (_in_phase(df, "sweep_fraction").any() or _in_phase(df, "sweep_lambda").any()):
            continue
        if len(main_rows(df)) == 0 and key != "sensitivity":
            continue
        made[key] = _save(make(df), folder / FIGURES[key]).name
    machines = "; ".join(sorted(set(df.machine)))
    if notes is None:
        from .config import CONFIGS

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
    text += ["## What the numbers say", "", "Computed from the tables below.", ""]
    text += [f"- {line}" for line in findings(df)] + [""]
    text += ["SaRA minus each other method, paired on (style, seed): mean ± standard error; ✓ SaRA clearly better, "
             "✗ clearly worse, ≈ within 2 standard errors, (tiny) = clear but under 2% of the other method's "
             "mean (for FID lower is better, so a negative difference is good).", ""]
    learned = learned_styles(df)
    unlearned = [st for st, v in learned.items() if v < LEARNED_AGREEMENT]
    if unlearned:
        rows = main_rows(df)
        for name, keep in (("learned", ~rows["style"].isin(unlearned)), ("unlearned", rows["style"].isin(unlearned))):
            text += [f"Styles full fine-tuning {name}:", "", paired_table(df, rows[keep]), ""]
    else:
        text += [paired_table(df), ""]
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
    if "tradeoff" in made:
        text += [f"![Trade-offs]({made['tradeoff']})", ""]
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
    text += ["## Sensitivity: trained fraction (θ) and λ", ""]
    if "sensitivity" in made:
        text += ["SaRA at its chosen learning rate on one style; the θ for each fraction is the |w| quantile it "
                 "implies on the course model. λ = 0 is the no-nuclear-norm ablation.", "",
                 f"![Sensitivity]({made['sensitivity']})", ""]
    else:
        text += ["_No sensitivity sweeps in this study._", ""]
    atomic_write_bytes(out, lambda tmp: Path(tmp).write_text("\n".join(text)))
    return out
