"""Which rows of the study's CSV each table reads, and how methods are named.

VLHI is relative (a min-max normalisation across the compared methods), so it
is computed the way the paper does it, across the fine-tuning methods of one
column of Table 1: here one style *and one seed*. The pretrained model is a
reference row and takes no part in it, and neither do the ablations: across
near-identical variants a min-max stretches a 2% difference to the whole 0-2
range, so the ablations are read as raw paired differences.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from .config import ABLATIONS, METHOD_LABELS, PRETRAINED, read_results


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


def in_phase(df: pd.DataFrame, phase: str) -> pd.Series:
    return df.phase.str.split("+").apply(lambda ps: phase in ps)


def with_vlhi(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with VLHI computed per (style, seed) across the methods in them."""
    from ..world.metrics import vlhi

    rows = rows.copy()
    rows["vlhi"] = np.nan
    for _, group in rows.groupby(["style", "seed"]):
        ok = group[np.isfinite(group.fid) & np.isfinite(group.agreement)]
        if len(ok) > 1:
            rows.loc[ok.index, "vlhi"] = vlhi(ok.fid.to_numpy(), ok.agreement.to_numpy())
    return rows


def finished_main(df: pd.DataFrame) -> pd.DataFrame:
    return df[in_phase(df, "main") & (df.status == "ok") & (df.prior == 0)]


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Finished main-grid runs of the compared methods (not the ablations), VLHI per (style, seed) across them."""
    rows = finished_main(df)
    return with_vlhi(rows[~rows.method.isin(ABLATIONS)])


def ablation_rows(df: pd.DataFrame) -> pd.DataFrame:
    """SaRA and its ablations on the styles the ablations ran on (no VLHI: see the module's docstring)."""
    rows = finished_main(df)
    styles = set(rows.loc[rows.method.isin(ABLATIONS), "style"])
    return rows[rows.method.isin(("sara", *ABLATIONS)) & rows["style"].isin(styles)]


#: Full fine-tuning's style agreement from which a style counts as learned in the budget.
LEARNED_AGREEMENT = 0.8


def learned_styles(df: pd.DataFrame) -> dict[str, float]:
    """Full fine-tuning's style agreement per style (mean over seeds); learned: >= :data:`LEARNED_AGREEMENT`."""
    rows = main_rows(df)
    full = rows[rows.method == "full"]
    return {s: float(v) for s, v in full.groupby("style").agreement.mean().items()} if len(full) else {}


def methods_in(rows: pd.DataFrame) -> list[str]:
    """The methods present in ``rows``, in the course's order."""
    return [m for m in METHOD_LABELS if m in set(rows.method)]


def label(method: str, rows: pd.DataFrame | None = None) -> str:
    """A method's name for tables (the rank-matched LoRA with its rank)."""
    if method == PRETRAINED:
        return "pretrained (no fine-tuning)"
    text = METHOD_LABELS.get(method, method)
    if method == "lora_matched" and rows is not None:
        ranks = sorted(set(rows.loc[rows.method == method, "lora_rank"]))
        if ranks:
            text = f"LoRA r={ranks[0]} (rank-matched)"
    return text
