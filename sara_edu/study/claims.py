"""The paper's claims, each with where the course checks it, a verdict and the number behind it.

Verdicts follow :mod:`sara_edu.study.stats`: "beats" needs a 95% t-interval that
excludes 0 in the paper's direction; "matches or beats" / "is kept" needs the
interval's bad end inside the metric's equivalence margin (non-inferiority); an
interval that settles neither reads "not detectable at this size", with about
how many pairs would settle it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .config import PRETRAINED
from .select import ablation_rows, label, main_rows
from .stats import Difference, margin_for, non_inferior, paired, pairs_needed, verdict
from .tables import difference_text, md_table, num

#: Where the other facts come from (both relative to the repository root).
CLAIMS_INPUTS = Path("reports") / "claims_inputs.csv"  # benchmarks/paper_claims.py
MEMORY_TABLE = Path("benchmarks") / "results" / "memory_time_cpu_sd15.csv"  # benchmarks/memory_time.py --models sd15
#: SaRA beside the rank-matched LoRA (and r=4) in one run of the same benchmark
#: (``--methods plain,sara,lora4,lora-matched``): a ratio compares rows of one run only.
MEMORY_LORA_TABLE = Path("benchmarks") / "results" / "memory_time_cpu_sd15_lora_matched.csv"

CLAIMS_COLUMNS = ["the paper's claim", "where the course checks it", "verdict", "number", "in the paper's words"]

#: The sentence of the paper (Hu et al., ICLR 2025, arXiv 2409.06633) behind each claim, by the start of the
#: claim's name. "abstract" is the arXiv listing's abstract (v2); a row with no single sentence says so.
PAPER_WORDS = {
    "The smallest 10-20%": ("the smallest 10% to 20% of parameters by absolute values do not contribute to the "
                            "generation process", "abstract"),
    "Small weights are only temporarily": ("re-utilizes these temporarily ineffective parameters, equating to "
                                           "optimizing a sparse weight matrix", "abstract"),
    "SaRA beats LoRA": ("our method achieves the best FID scores, indicating our method effectively improves the "
                        "performance of the pre-trained models on the main task", "§5, backbone fine-tuning"),
    "SaRA matches or beats full fine-tuning": (None, "no single sentence: full fine-tuning is a baseline in the "
                                                     "paper's tables"),
    "The nuclear-norm term": ("To mitigate overfitting, we propose a nuclear-norm-based low-rank sparse training "
                              "scheme", "abstract"),
    "Progressive adjustment": ("we design a new progressive parameter adjustment strategy to make full use of the "
                               "re-trained/finetuned parameters", "abstract"),
    "Unstructured backpropagation": ("a novel unstructural backpropagation strategy, which significantly reduces "
                                     "memory costs during fine-tuning", "abstract"),
    "SaRA needs less training memory": (None, "no single sentence: the paper's memory figure (GPU) sets SaRA "
                                              "beside LoRA"),
    "One line of code": ("requires only a single line of code modification for efficient implementation",
                         "abstract"),
    "Generalisation to unseen prompts": ("outperforms traditional fine-tuning methods like LoRA in maintaining "
                                         "model's generalization ability", "abstract"),
    "The pretrained model's knowledge": ("outperforms traditional fine-tuning methods like LoRA in maintaining "
                                         "model's generalization ability", "abstract"),
}


def paper_words(claim: str) -> str:
    """The quoted sentence (and where it stands) behind ``claim``; every claim row must have one."""
    for start, (quote, where) in PAPER_WORDS.items():
        if claim.startswith(start):
            return f"\u201c{quote}\u201d ({where})" if quote else f"({where})"
    raise KeyError(f"claim {claim!r} has no entry in PAPER_WORDS; add the paper's sentence for it")


def _undecided(d: Difference, col: str, higher_is_better: bool | None = None) -> str:
    n = pairs_needed(d, margin_for(col).of(d.scale), higher_is_better)
    return f"not detectable at this size ({d.n} pairs; about {n} would settle it)" if n else \
        f"not detectable at this size ({d.n} pairs)"


def beats_verdict(d: Difference, col: str, higher_is_better: bool) -> str:
    """For "SaRA beats X": held / did not hold (the opposite) / not detectable at this size."""
    kind = verdict(d, higher_is_better, margin_for(col).of(d.scale))
    if not kind:
        return "not testable here (too few runs)"
    if kind == "equivalent":
        return f"did not hold (equivalent within the margin {num(margin_for(col).of(d.scale), 2)})"
    return {"better": "held", "worse": "did not hold (the opposite)"}.get(kind) or _undecided(d, col)


def kept_verdict(d: Difference, col: str, higher_is_better: bool = True) -> str:
    """For "SaRA matches or beats X" / "is kept": non-inferiority within the metric's margin."""
    kind = non_inferior(d, higher_is_better, margin_for(col).of(d.scale))
    if not kind:
        return "not testable here (too few runs)"
    margin = margin_for(col).of(d.scale)
    if kind == "held":
        return f"held (95% interval not worse than the margin {num(margin, 2)})"
    if kind == "did not hold":
        return f"did not hold (worse by more than the margin {num(margin, 2)})"
    text = _undecided(d, col, higher_is_better)
    if d.low > 0 or d.high < 0:  # a real difference whose size the data cannot place against the margin
        worse = (d.mean < 0) == higher_is_better
        text += (f": SaRA is {'worse' if worse else 'better'} (the interval excludes 0), "
                 f"by less or more than the margin {num(margin, 2)}")
    return text


def paired_text(d: Difference) -> str:
    return f"{difference_text(d)} over {d.n} (style, seed) pairs (95% t-interval)" if d.n else ""


def _facts(root: Path) -> dict:
    if not (root / CLAIMS_INPUTS).exists():
        return {}
    f = pd.read_csv(root / CLAIMS_INPUTS)
    return {(r.claim, r.measure): float(r.value) for r in f.itertuples()}


def _benchmark_claims(facts: dict) -> list[list[str]]:
    """The two claims that need no training (benchmarks/paper_claims.py)."""
    out = []
    if ("zeroing", "fid_at_0") in facts:
        fid0, ag0 = facts[("zeroing", "fid_at_0")], facts[("zeroing", "agreement_at_0")]
        held = [pct for pct in (10, 15, 20) if ("zeroing", f"fid_at_{pct}") in facts
                and facts[("zeroing", f"fid_at_{pct}")] <= 1.15 * fid0
                and facts[("zeroing", f"agreement_at_{pct}")] >= ag0 - 0.05]
        number = "; ".join(f"{pct}%: FID {num(facts[('zeroing', f'fid_at_{pct}')], 3)}, agreement "
                           f"{facts[('zeroing', f'agreement_at_{pct}')]:.2f}" for pct in (0, 10, 15, 20)
                           if ("zeroing", f"fid_at_{pct}") in facts)
        verdict_ = ("held up to 20%" if 20 in held else f"held up to {max(held)}%, not at 20%" if held
                    else "did not hold")
        out.append(["The smallest 10-20% of the weights can be zeroed with little change",
                    "notebook 02; `benchmarks/paper_claims.py`",
                    f"{verdict_} (little = FID within +15%, agreement within 0.05)", number])
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
    return out


def _memory_claims(root: Path) -> list[list[str]]:
    mem = root / MEMORY_TABLE
    if not mem.exists():
        return []
    col = "tracker peak above frozen (MB)"
    tables = [pd.read_csv(p).set_index("key") for p in (mem, root / MEMORY_LORA_TABLE) if p.exists()]

    def ratio(a, b):  # from the first table (run) that has both rows
        for t in tables:
            if {a, b} <= set(t.index):
                return float(t.at[a, col] / t.at[b, col])
        return math.nan

    def name(key):
        return next((t.at[key, "method"] for t in tables if key in t.index), key)

    sel = ratio("sara", "selective")
    out = [["Unstructured backpropagation saves memory against selective fine-tuning",
            "`benchmarks/memory_time.py` (SD-1.5-sized UNet, CPU)",
            "held" if sel < 1 else "did not hold" if np.isfinite(sel) else "not measured",
            f"SaRA's tracker peak is {sel:.2f}x selective fine-tuning's (10% of the entries)"]]
    for key in ("lora-matched", "lora4"):  # the rank-matched LoRA where measured, and the diffusers default
        vs = ratio("sara", key)
        if not np.isfinite(vs):
            continue
        out.append([f"SaRA needs less training memory than LoRA ({name(key)})",
                    "`benchmarks/memory_time.py` (SD-1.5-sized UNet, CPU)", "did not hold" if vs > 1 else "held",
                    f"SaRA's tracker peak is {vs:.2f}x that of {name(key)}; the paper's own figure (GPU, "
                    "its budgets) is not reproduced here"])
    return out


def claims_rows(df: pd.DataFrame, root: Path) -> list[list[str]]:
    """The paper's claims -> [claim, where the course checks it, verdict, the number, the paper's words]."""
    rows, abl = main_rows(df), ablation_rows(df)
    out = _benchmark_claims(_facts(root))
    lora = "lora_matched" if "lora_matched" in set(rows.method) else "lora_r4"
    for col, what, hib in (("fid", "the FID analogue", False), ("agreement", "prompt agreement (CLIP-score analogue)",
                                                                   True), ("vlhi", "VLHI", True)):
        d = paired(rows, "sara", lora, col)
        out.append([f"SaRA beats LoRA on {what}", "this study (Table 1, paired table)", beats_verdict(d, col, hib),
                    f"SaRA − {label(lora, rows)}: " + paired_text(d)])
    for col, what in (("vlhi", "VLHI"), ("agreement", "prompt agreement"), ("fid", "the FID analogue")):
        d = paired(rows, "sara", "full", col)
        out.append([f"SaRA matches or beats full fine-tuning ({what})", "this study (Table 1, paired table)",
                    kept_verdict(d, col, col != "fid"), "SaRA − full fine-tuning: " + paired_text(d)])
    d = paired(abl, "sara", "sara_no_nuclear", "unseen_agreement")
    e = paired(abl, "sara", "sara_no_nuclear", "unseen_fid")
    out.append(["The nuclear-norm term reduces overfitting", "this study (ablations)",
                beats_verdict(d, "unseen_agreement", True) if d.n else "not testable here (no runs)",
                f"unseen-digit agreement {paired_text(d)}; unseen-digit FID {paired_text(e)}"])
    d = paired(abl, "sara", "sara_no_progressive", "agreement")
    e = paired(abl, "sara", "sara_no_progressive", "fid")
    out.append(["Progressive adjustment helps", "this study (ablations)",
                beats_verdict(d, "agreement", True) if d.n else "not testable here (no runs)",
                f"SaRA − SaRA without it: prompt agreement {paired_text(d)}; style FID {paired_text(e)}"])
    out += _memory_claims(root)
    out.append(["One line of code to use", "`tests/sara/scripts/accelerate_sara.py` (the diffusers loop, only the "
                "optimizer line changed, 1 and 2 processes)", "held", "one changed line"])
    for other in ("full", lora):
        d = paired(rows, "sara", other, "unseen_agreement")
        out.append([f"Generalisation to unseen prompts is kept (vs {label(other, rows)})",
                    "this study (retention and generalisation)", kept_verdict(d, "unseen_agreement"),
                    "unseen-digit agreement, SaRA − it: " + paired_text(d)])
    d = paired(rows, "sara", lora, "plain_agreement")
    out.append([f"The pretrained model's knowledge is kept better than by LoRA (plain prompts, vs {label(lora, rows)})",
                "this study (retention)", beats_verdict(d, "plain_agreement", True),
                "plain-prompt agreement, SaRA − it: " + paired_text(d)])
    pre = df[(df.method == PRETRAINED)]
    if len(pre) and "sara" in set(rows.method):
        before = float(pre.plain_agreement.mean())
        after = float(rows.loc[rows.method == "sara", "plain_agreement"].mean())
        out.append(["The pretrained model's knowledge is kept (plain prompts)", "this study (retention)",
                    "held" if after >= before - 0.1 else "did not hold",
                    f"plain-prompt agreement {before:.2f} before, {after:.2f} after SaRA"])
    return [row + [paper_words(row[0])] for row in out]


def seeds_text(df: pd.DataFrame, planned: int = 5) -> str:
    """Why the main grid has the seeds it has: the pairs each undecided SaRA comparison would need (if its mean
    and spread stayed as measured) against what ``planned`` seeds would give."""
    rows = main_rows(df)
    if "sara" not in set(rows.method):
        return ""
    styles, seeds = rows["style"].nunique(), rows.seed.nunique()
    lora = "lora_matched" if "lora_matched" in set(rows.method) else "lora_r4"
    needs = []
    for other, col, hib, question in (*((lora, c, h, "beats") for c, h in (("fid", False), ("agreement", True),
                                                                         ("vlhi", True))),
                                      *(("full", c, h, "kept") for c, h in (("fid", False), ("agreement", True),
                                                                          ("vlhi", True), ("unseen_agreement", True)))):
        if other not in set(rows.method):
            continue
        d = paired(rows, "sara", other, col)
        margin = margin_for(col).of(d.scale)
        undecided = (verdict(d, hib, margin) if question == "beats" else non_inferior(d, hib, margin)) == \
            "not detectable"
        if undecided:
            needs.append((f"SaRA − {label(other, rows)} on {col}",
                          pairs_needed(d, margin, None if question == "beats" else hib)))
    have, would = styles * seeds, styles * planned
    seed_word = "seed" if seeds == 1 else "seeds"
    if not needs:
        return (f"**Seeds.** {seeds} {seed_word} ({have} pairs) settle every comparison of SaRA in the claims table; "
                f"{planned} seeds ({would} pairs) would add nothing to the verdicts.")
    listed = "; ".join(f"{what}: about {n} pairs" if n else f"{what}: more than 10,000 pairs" for what, n in needs)
    settled = [what for what, n in needs if n and n <= would]
    tail = (f"{planned} seeds ({would} pairs) would settle {', '.join(settled)}" if settled else
            f"{planned} seeds ({would} pairs) would settle none of them, so the grid keeps {seeds} and the CPU time "
            "went to the controls")
    return (f"**Seeds.** {seeds} {seed_word} ({have} pairs). The comparisons of SaRA that {have} pairs leave undecided "
            f"would need, if their means and spreads stayed as measured: {listed}. {tail}.")


def claims_table(df: pd.DataFrame, root: Path) -> str:
    return md_table(CLAIMS_COLUMNS, claims_rows(df, root))
