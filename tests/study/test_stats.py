"""The study's statistics: 95% t-intervals, equivalence margins and the verdicts read from them."""
import math

import numpy as np
import pandas as pd
import pytest

from sara_edu.study.stats import (
    Difference,
    margin_for,
    non_inferior,
    paired_series,
    pairs_needed,
    t_quantile,
    verdict,
)


def _diff(values, scale=1.0):
    return Difference(mean=float(np.mean(values)), sd=float(np.std(values, ddof=1)), n=len(values),
                      a_higher=int(np.sum(np.asarray(values) > 0)), scale=scale)


def _half(k, d):
    """Half the 95% t-interval d would have with k pairs."""
    return t_quantile(k) * d.sd / math.sqrt(k)


def test_the_interval_is_a_95_percent_t_interval_not_two_standard_errors():
    # t(0.975) with 2, 4 and 14 degrees of freedom (tables): 3 pairs need 4.30 standard errors, not 2
    assert t_quantile(3) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(5) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(15) == pytest.approx(2.1448, abs=1e-4)
    assert math.isnan(t_quantile(1))
    d = _diff([1.0, 2.0, 3.0])  # mean 2, sd 1, se 1/sqrt(3)
    assert d.half_width == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert (d.low, d.high) == pytest.approx((2 - d.half_width, 2 + d.half_width))


def test_pairing_uses_the_common_pairs_and_the_other_methods_scale():
    a = pd.Series([1.0, 2.0, 4.0], index=["x", "y", "z"])
    b = pd.Series([0.5, 1.0, np.nan], index=["x", "y", "z"])
    d = paired_series(a, b)
    assert (d.n, d.mean, d.a_higher) == (2, pytest.approx(0.75), 2)
    assert d.scale == pytest.approx(0.75)  # mean |b| over what b has


def test_verdicts_read_the_interval_against_the_margin():
    # a clear difference either way
    assert verdict(_diff([0.30, 0.32, 0.31]), True, 0.05) == "better"
    assert verdict(_diff([0.30, 0.32, 0.31]), False, 0.05) == "worse"
    # inside the margin on both ends: equivalent
    assert verdict(_diff([0.01, -0.01, 0.0]), True, 0.05) == "equivalent"
    # the old rule's case: -0.128 mean, 0.079 standard error over 15 pairs would be "within 2 SE";
    # here with 3 pairs the same mean and SE reach past a 0.1 margin: not detectable
    sd = 0.079 * math.sqrt(3)
    d = Difference(mean=-0.128, sd=sd, n=3, a_higher=0, scale=1.0)
    assert verdict(d, True, 0.1) == "not detectable"
    assert verdict(Difference(mean=1.0, sd=1.0, n=1, a_higher=1, scale=1.0), True, 0.1) == ""


def test_pairs_needed_is_the_smallest_size_that_settles_it():
    d = Difference(mean=0.2, sd=math.sqrt(0.02), n=2, a_higher=2, scale=1.0)
    n = pairs_needed(d, margin=0.05)
    assert _half(n, d) < d.mean <= _half(n - 1, d)
    # a mean of 0 with spread is settled only by equivalence: |0| + h < margin
    z = Difference(mean=0.0, sd=0.1, n=3, a_higher=1, scale=1.0)
    m = pairs_needed(z, margin=0.05)
    assert _half(m, z) < 0.05 <= _half(m - 1, z)
    # a mean right at the margin with no room for an interval: no size settles it
    assert pairs_needed(Difference(mean=0.0, sd=1.0, n=3, a_higher=1, scale=1.0), margin=0.0, limit=50) is None
    # one-sided (non-inferiority): -0.0365 with the interval past -0.05 needs the bad end inside the margin,
    # i.e. h < 0.0135; the two-sided size (the interval excluding 0) would be far smaller
    w = Difference(mean=-0.0365, sd=0.054, n=15, a_higher=3, scale=1.0)
    one = pairs_needed(w, 0.05, higher_is_better=True)
    assert _half(one, w) < 0.0135 <= _half(one - 1, w)
    assert pairs_needed(w, 0.05) < 15 < one
    # for a lower-is-better metric the same numbers are an improvement: settled with fewer pairs than it has
    better = pairs_needed(w, 0.05, higher_is_better=False)
    assert better < w.n and 0.0365 - _half(better, w) > -0.05


def test_non_inferiority_asks_only_that_the_bad_end_stays_within_the_margin():
    # SaRA − full: -0.02 ± small on agreement (higher is better), margin 0.05 -> held
    good = _diff([-0.02, -0.021, -0.019])
    assert non_inferior(good, True, 0.05) == "held"
    # clearly worse by more than the margin
    bad = _diff([-0.2, -0.21, -0.19])
    assert non_inferior(bad, True, 0.05) == "did not hold"
    # for a lower-is-better metric the same numbers are an improvement
    assert non_inferior(bad, False, 0.05) == "held"
    wide = _diff([-0.2, 0.1, 0.05])
    assert non_inferior(wide, True, 0.05) == "not detectable"


def test_margins_are_stated_per_metric():
    assert margin_for("agreement").of(123.0) == pytest.approx(0.05)  # absolute
    assert margin_for("fid").of(400.0) == pytest.approx(40.0)  # 10% of the other method's mean
    assert margin_for("vlhi").of(1.9) == pytest.approx(0.1)
