"""Paired differences and the verdicts a reviewer accepts.

Two methods trained on the same (style, seed) make a pair; their difference per
pair removes what the style and the seed do to both. Over n pairs the mean
difference gets a **95% t-interval** (mean ± t(0.975, n−1)·sd/√n). With 3 pairs
t is 4.30, so "2 standard errors" would be an 82% interval, not a 95% one.

A verdict then reads the interval against an **equivalence margin**: the
smallest difference that matters for that metric (:data:`MARGINS`, stated in
the report):

* ``better`` / ``worse``: the interval excludes 0.
* ``equivalent``: the interval lies inside ±margin (so "matches" has a meaning).
* ``not detectable``: the interval holds 0 and reaches past the margin. The data
  cannot tell; :func:`pairs_needed` says how many pairs would, if the mean and
  spread stayed as measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

CONFIDENCE = 0.95


def t_quantile(n: int) -> float:
    """The two-sided t factor of a :data:`CONFIDENCE` interval on ``n`` pairs (n − 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + CONFIDENCE / 2, n - 1)) if n > 1 else math.nan


@dataclass(frozen=True)
class Margin:
    """The smallest difference that matters: ``absolute``, or ``relative`` × the other method's mean."""

    absolute: float = 0.0
    relative: float = 0.0

    def of(self, scale: float) -> float:
        return self.absolute + self.relative * (abs(scale) if np.isfinite(scale) else 0.0)


#: Equivalence margins per metric. Agreements are fractions of images (0.05 = one image in 20); the FID analogue
#: and the loss vary over orders of magnitude between methods, so their margin is relative; VLHI runs from 0 to 2.
MARGINS = {
    "agreement": Margin(absolute=0.05), "plain_agreement": Margin(absolute=0.05),
    "unseen_agreement": Margin(absolute=0.05), "unseen_look_acc": Margin(absolute=0.05),
    "fid": Margin(relative=0.10), "unseen_fid": Margin(relative=0.10), "plain_fid": Margin(relative=0.10),
    "plain_drift": Margin(relative=0.10), "final_loss": Margin(relative=0.02), "vlhi": Margin(absolute=0.10),
    "gated_agreement": Margin(absolute=0.05), "kid": Margin(relative=0.10),
}


#: The margins in words, for the report.
MARGINS_TEXT = ("Equivalence margins (the smallest difference that matters): 0.05 for an agreement (one image in 20), "
                "10% of the other method's mean for an FID analogue or the change vs pretrained, 0.1 for VLHI "
                "(range 0-2), 2% of the other method's mean for the training loss")


def margin_for(col: str) -> Margin:
    return MARGINS.get(col, Margin(relative=0.05))


@dataclass(frozen=True)
class Difference:
    """``a − b`` over the pairs both have: mean, spread, count, and the other method's scale."""

    mean: float
    sd: float
    n: int
    a_higher: int  # pairs where a > b
    scale: float  # mean |b|: what a relative margin is a share of

    @property
    def half_width(self) -> float:
        """Half the 95% t-interval (nan below 2 pairs)."""
        return t_quantile(self.n) * self.sd / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def paired_series(pa: pd.Series, pb: pd.Series) -> Difference:
    """``pa − pb`` over their common index."""
    d = (pa - pb).dropna()
    n = len(d)
    return Difference(mean=float(d.mean()) if n else math.nan, sd=float(d.std(ddof=1)) if n > 1 else math.nan,
                      n=n, a_higher=int((d > 0).sum()), scale=float(pb.abs().mean()) if len(pb) else math.nan)


def paired(rows: pd.DataFrame, a: str, b: str, col: str) -> Difference:
    """Method ``a`` minus method ``b`` of ``col``, paired on (style, seed)."""
    pa = rows[rows.method == a].set_index(["style", "seed"])[col]
    pb = rows[rows.method == b].set_index(["style", "seed"])[col]
    return paired_series(pa, pb)


def pairs_needed(d: Difference, margin: float, higher_is_better: bool | None = None,
                 limit: int = 10_000) -> int | None:
    """How many pairs would settle ``d`` if its mean and sd stayed as measured; ``None`` beyond ``limit``.

    Two-sided (``higher_is_better=None``, the question of :func:`verdict`): the
    smallest n whose interval would exclude 0 or fit inside ±margin. One-sided
    (the question of :func:`non_inferior`): the smallest n whose interval's bad
    end would stay within the margin, or whose whole interval would lie beyond it.
    """
    if not (np.isfinite(d.mean) and np.isfinite(d.sd)):
        return None
    mean = d.mean if higher_is_better in (None, True) else -d.mean
    for n in range(2, limit + 1):
        h = t_quantile(n) * d.sd / math.sqrt(n)
        if higher_is_better is None:
            settled = h < abs(mean) or abs(mean) + h < margin
        else:
            settled = mean - h > -margin or mean + h < -margin
        if settled:
            return n
    return None


#: The kinds of verdict, each with its table mark.
MARKS = {"better": "✓", "worse": "✗", "equivalent": "=", "not detectable": "?"}


def verdict(d: Difference, higher_is_better: bool, margin: float) -> str:
    """``better``, ``worse``, ``equivalent`` or ``not detectable`` ('' with under 2 pairs)."""
    if d.n < 2 or not (np.isfinite(d.mean) and np.isfinite(d.sd)):
        return ""
    if d.low > 0 or d.high < 0:
        return "better" if (d.mean > 0) == higher_is_better else "worse"
    if -margin < d.low and d.high < margin:
        return "equivalent"
    return "not detectable"


def non_inferior(d: Difference, higher_is_better: bool, margin: float) -> str:
    """For "matches or beats": ``held`` when the interval's bad end stays within the margin, ``did not hold``
    when the whole interval is worse than the margin, else ``not detectable``."""
    if d.n < 2 or not (np.isfinite(d.mean) and np.isfinite(d.sd)):
        return ""
    worst = d.low if higher_is_better else -d.high  # the interval's bad end, in "higher is better" terms
    best = d.high if higher_is_better else -d.low
    if worst > -margin:
        return "held"
    if best < -margin:
        return "did not hold"
    return "not detectable"


def seed_stats(rows: pd.DataFrame, col: str, by=("method", "style")) -> pd.DataFrame:
    """Mean and standard deviation over seeds of ``col`` per ``by`` group (+ count)."""
    g = rows.groupby(list(by))[col]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})


def style_mean_stats(rows: pd.DataFrame, col: str) -> pd.DataFrame:
    """Per method: average over styles within each seed, then mean and std over seeds."""
    per_seed = rows.groupby(["method", "seed"])[col].mean()
    g = per_seed.groupby("method")
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})
