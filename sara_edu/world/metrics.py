"""Measuring generated images: the course's FID, CLIP score and VLHI.

The paper scores every fine-tuning method with three numbers (Sec. 5):

=================  ==========================================  =====================================
paper              what it measures                            here
=================  ==========================================  =====================================
FID                style fit: do samples look like the         :func:`fid_analogue`: Fréchet distance
                   fine-tuning set?                            on the reference classifier's features;
                                                               :func:`kid_analogue` beside it (unbiased
                                                               on small sets)
CLIP score         prior kept: does the image still show what  :func:`prompt_agreement`: the reference
                   the prompt asks for?                        classifier reads digit *and* look
VLHI               the balance of both, normalised across      :func:`vlhi` / :func:`vlhi_table`
                   the compared methods
=================  ==========================================  =====================================

:func:`evaluate` runs the whole protocol for one model and one look, and
:func:`per_digit_recognition` is the pretrained model's quality bar.
All numbers use the shipped reference classifier (:func:`sara_edu.world.classifier.load_classifier`)
unless you pass another one.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import ConfigError, DataError, PromptError
from .classifier import ReferenceClassifier, check_images, load_classifier
from .quality import load_gate
from .model import SCHEDULER_CONFIG
from .sampling import check_guidance_scale, check_int, check_seed, check_steps
from .styles import LOOKS

# Sampling used by evaluate() and per_digit_recognition() unless told otherwise: the
# generate() defaults. On the shipped model (2-core CPU, one thread) 25 DDIM steps at
# guidance 3 gave 100% recognition for every digit (20 per digit, ~35 s of CPU for 200
# images); 10 steps also gave 100% in ~15 s; guidance 1 (no CFG) dropped to 80-100%.
EVAL_STEPS = 25
EVAL_GUIDANCE = 3.0


class _Features(nn.Module):
    """Adapter handing torchmetrics the classifier's penultimate features, as float64.

    Declaring ``num_features`` stops torchmetrics from probing the network with
    a 299x299 dummy image (its Inception default), which our 16x16 net cannot read.
    """

    def __init__(self, classifier: ReferenceClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.embed(images)


def fid_analogue(real: torch.Tensor, fake: torch.Tensor, classifier: ReferenceClassifier | None = None) -> float:
    """Fréchet distance between two image sets in the reference classifier's feature space.

    Stands in for the paper's **FID** (Fréchet Inception Distance): each set of
    features is summarised by a Gaussian (mean ``mu``, covariance ``S``) and

        d² = ‖mu_r − mu_f‖² + Tr(S_r + S_f − 2 (S_r S_f)^½)

    Lower is better; identical sets give 0. The features are the 64-dim
    penultimate layer of :class:`~sara_edu.world.classifier.ReferenceClassifier`
    instead of Inception-v3's 2048-dim pool layer.

    Implementation: torchmetrics' ``FrechetInceptionDistance`` with our network as
    its ``feature`` extractor (it accepts any ``nn.Module`` exposing ``num_features``,
    accumulates the statistics in float64 and takes the matrix square root through
    the eigenvalues of ``S_r S_f``), so the formula is the same code the wider
    ecosystem uses. Like every FID it is biased upwards for small sets: compare
    numbers computed with the same set sizes only.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = check_images(real, "real"), check_images(fake, "fake")
    for name, x in (("real", real), ("fake", fake)):
        if len(x) < 2:
            raise DataError(f"{name} has {len(x)} image; a covariance needs at least 2 (use 50+ for a stable number)")
    classifier = classifier or load_classifier()
    metric = FrechetInceptionDistance(feature=_Features(classifier))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return max(float(metric.compute()), 0.0)  # round-off can give -1e-12 for identical sets


def kid_analogue(real: torch.Tensor, fake: torch.Tensor, classifier: ReferenceClassifier | None = None) -> float:
    """Kernel distance (KID) between two image sets in the reference classifier's feature space.

    The squared maximum mean discrepancy with the cubic polynomial kernel
    ``k(x, y) = (xᵀy / d + 1)³`` (torchmetrics' ``poly_kernel``, as KID uses
    on Inception features), estimated without bias on *all* images of both sets
    (the U-statistic: each within-set sum leaves out the diagonal)::

        MMD² = Σ_{i≠j} k(r_i, r_j) / (m(m−1)) + Σ_{i≠j} k(f_i, f_j) / (n(n−1)) − 2 Σ k(r_i, f_j) / (mn)

    Unlike the FID analogue its expectation does not depend on the set sizes, so
    it is the number to trust on 18-42 samples; it is 0 in expectation for two
    sets from the same distribution and can then come out slightly negative.
    torchmetrics' own KID draws random equal-size subsets; the held-out set is
    larger than the samples, so this uses the unequal-size estimator directly.
    """
    from torchmetrics.image.kid import poly_kernel

    real, fake = check_images(real, "real"), check_images(fake, "fake")
    for name, x in (("real", real), ("fake", fake)):
        if len(x) < 2:
            raise DataError(f"{name} has {len(x)} image; KID needs at least 2 per set (use 20+ for a stable number)")
    classifier = classifier or load_classifier()
    with torch.no_grad():
        fr, ff = (classifier.embed(x).double() for x in (real, fake))
    m, n = len(fr), len(ff)
    k_rr, k_ff, k_rf = poly_kernel(fr, fr), poly_kernel(ff, ff), poly_kernel(fr, ff)
    within_r = (k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
    within_f = (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1))
    return float(within_r + within_f - 2 * k_rf.mean())


def _per_image(value, n: int, name: str) -> list:
    """Broadcast one digit/style to ``n`` images, or check a per-image sequence has length ``n``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if value is None or isinstance(value, (str, int, np.integer)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise DataError(f"{name} has {len(value)} entries for {n} images; pass one per image or a single value")
    return value


def _look_index(style) -> int:
    look = "plain" if style in (None, "") else str(style).lower()
    if look not in LOOKS:
        raise PromptError(f"unknown style {style!r}; choose one of {', '.join(LOOKS)} (None means plain)")
    return LOOKS.index(look)


def prompt_agreement(images: torch.Tensor, digits, style=None,
                     classifier: ReferenceClassifier | None = None, per_image: bool = False) -> dict:
    """How often the images show what their prompt asked for.

    Stands in for the paper's **CLIP score** (image-text agreement). CLIP scores a
    whole caption at once; our prompt has two parts, so the reference classifier
    checks each: ``digit_acc`` (the digit is the prompted one: content, the prior
    the paper wants preserved), ``look_acc`` (the look is the prompted style) and
    ``agreement``, the fraction where *both* match, the number to compare with
    the CLIP score. ``digits`` and ``style`` are one value for all images or one
    per image (``style=None`` means plain). ``per_image=True``: one bool per
    image for each instead of the shares.
    """
    images = check_images(images)
    n = len(images)
    digit_list = _per_image(digits, n, "digits")
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d <= 9 for d in digit_list):
        raise DataError(f"digits must be integers 0..9, got {sorted(set(digit_list), key=str)[:5]}")
    want_digit = torch.tensor([int(d) for d in digit_list])
    want_look = torch.tensor([_look_index(s) for s in _per_image(style, n, "style")])
    pred = (classifier or load_classifier()).predict(images)
    digit_ok, look_ok = pred["digit"] == want_digit, pred["look"] == want_look
    if per_image:  # one bool per image instead of the shares
        return {"digit_acc": digit_ok, "look_acc": look_ok, "agreement": digit_ok & look_ok, "n": n}
    return {"digit_acc": digit_ok.float().mean().item(), "look_acc": look_ok.float().mean().item(),
            "agreement": (digit_ok & look_ok).float().mean().item(), "n": n}


def gated_prompt_agreement(images: torch.Tensor, digits, style=None,
                           classifier: ReferenceClassifier | None = None) -> dict:
    """:func:`prompt_agreement`'s shares from one classifier pass, plus ``gate_pass`` (the share of images that
    pass the quality gate, :mod:`sara_edu.world.quality`) and ``gated_agreement`` (the share that agree *and*
    pass: a sample the classifier reads right but a person would reject counts as wrong)."""
    classifier = classifier or load_classifier()
    per = prompt_agreement(images, digits, style, classifier, per_image=True)
    passed = load_gate(classifier).passes(images, style, classifier)
    shares = {k: per[k].float().mean().item() for k in ("digit_acc", "look_acc", "agreement")}  # as the shares
    return {**shares, "gate_pass": float(passed.double().mean()),
            "gated_agreement": float((per["agreement"] & passed).double().mean()), "n": per["n"]}


def _minmax(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    lo, hi = values.min(), values.max()
    if hi == lo:  # every method ties: the metric cannot rank them, so all sit in the middle
        return np.full_like(values, 0.5)
    return (values - lo) / (hi - lo) if higher_is_better else (hi - values) / (hi - lo)


def vlhi(fid: Sequence[float], clip: Sequence[float]) -> np.ndarray:
    """The paper's **Visual-Linguistic Harmony Index** for methods compared side by side.

    Given the FID and CLIP score of methods i = 1..n (Hu et al. 2025, Sec. 5)::

        VLHI_i = (max_j FID_j − FID_i) / (max_j FID_j − min_j FID_j)
               + (CLIP_i − min_j CLIP_j) / (max_j CLIP_j − min_j CLIP_j)

    Each term is a min-max normalisation *across the compared methods*, so VLHI
    lies in [0, 2]: 2 means best FID and best CLIP score of the table, 0 worst of
    both. It is relative: adding a method to the comparison changes everyone's
    VLHI. Here ``clip`` is :func:`prompt_agreement`'s ``agreement`` (or any
    higher-is-better score). If all methods tie on one metric, that term is 0.5
    for all of them (the paper leaves 0/0 undefined).
    """
    fid = np.asarray(fid, dtype=np.float64)
    clip = np.asarray(clip, dtype=np.float64)
    if fid.ndim != 1 or fid.shape != clip.shape or len(fid) == 0:
        raise DataError(f"fid and clip must be 1-D with one value per method, got shapes {fid.shape} and {clip.shape}")
    if not (np.isfinite(fid).all() and np.isfinite(clip).all()):
        raise DataError("fid and clip contain NaN or infinite values; drop the failed runs first")
    return _minmax(fid, higher_is_better=False) + _minmax(clip, higher_is_better=True)


def vlhi_table(df: pd.DataFrame, fid_col: str = "fid", clip_col: str = "agreement", by=None,
               out_col: str = "vlhi") -> pd.DataFrame:
    """Add a VLHI column to a results table (one row per method), as in the paper's Table 1.

    The normalisation runs across the *rows* of the table, i.e. across the
    methods being compared. The paper does it separately for each backbone and
    dataset, across all methods and parameter budgets in that column of Table 1
    (e.g. SD1.5 / BarbieCore: LoRA, AdaptFormer, LT-SFT, SaRA at 50M, 20M, 5M and
    full fine-tuning: 13 rows). Pass ``by="style"`` (or a list of columns) to
    normalise within each group the same way. Returns a copy of ``df``.
    See :func:`vlhi` for the formula.
    """
    if not isinstance(df, pd.DataFrame) or len(df) == 0:
        raise DataError("vlhi_table needs a non-empty pandas DataFrame with one row per method")
    missing = [c for c in (fid_col, clip_col, *([] if by is None else np.atleast_1d(by))) if c not in df.columns]
    if missing:
        raise DataError(f"columns {missing} are not in the table; it has {list(df.columns)}")
    out = df.copy()
    if by is None:
        out[out_col] = vlhi(out[fid_col].to_numpy(), out[clip_col].to_numpy())
    else:
        out[out_col] = np.nan
        for _, group in out.groupby(by, sort=False):
            out.loc[group.index, out_col] = vlhi(group[fid_col].to_numpy(), group[clip_col].to_numpy())
    return out


def _check_sampling(n_per_digit: int, steps: int, digits, seed, guidance_scale) -> list[int]:
    """Check the protocol's arguments before any sampling (generate checks the rest again, cheaply)."""
    if isinstance(digits, (str, bytes)) or not isinstance(digits, Iterable):
        raise DataError(f"digits must be a collection of integers 0..9 such as range(10) or [3, 7], got {digits!r}")
    digits = list(digits)
    if not digits or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d <= 9
                         for d in digits):
        raise DataError(f"digits must be a non-empty collection of integers 0..9, got {digits}")
    check_int(n_per_digit, "n_per_digit", 1, hint="how many samples per digit")
    check_steps(steps, SCHEDULER_CONFIG["num_train_timesteps"])
    check_seed(seed)
    check_guidance_scale(guidance_scale)
    return [int(d) for d in digits]


def evaluate(pipe, style: str | None = None, digits=range(10), n_per_digit: int = 10, seed: int = 0,
             steps: int = EVAL_STEPS, guidance_scale: float = EVAL_GUIDANCE,
             classifier: ReferenceClassifier | None = None) -> dict:
    """The paper's evaluation protocol for one model and one look, in miniature.

    Generates ``n_per_digit`` samples of ``"a digit k[, <style> style]"`` for each
    digit k (with :func:`sara_edu.world.model.generate`), then reports

    * ``fid``: :func:`fid_analogue` against the held-out real images of that look
      and those digits (the paper: FID against the style dataset),
    * ``fid_floor``: the same distance for an equally sized set of *real* training
      images of that look: what a perfect model would score at this sample size,
    * ``kid`` and ``kid_floor``: the same two with :func:`kid_analogue` (unbiased,
      so its floor is about 0 at any size),
    * ``digit_acc``, ``look_acc``, ``agreement``: :func:`prompt_agreement`
      (the paper: CLIP score),
    * ``gate_pass`` and ``gated_agreement``: :func:`gated_prompt_agreement` (do the
      samples look like real images of their look at all, and the agreement
      counting only those).

    Returns a flat dict; ``pd.DataFrame([evaluate(a), evaluate(b)])`` gives a table
    for :func:`vlhi_table`. About 10 per digit is enough for notebooks (seconds on
    a CPU). FID is biased upwards at that size (``fid_floor`` shows by how much),
    so compare only runs with the same digits and ``n_per_digit``.
    """
    from .data import load_digits_images
    from .model import generate
    from .text import make_prompt

    digits = _check_sampling(n_per_digit, steps, digits, seed, guidance_scale)
    if len(digits) * n_per_digit < 2:
        raise ConfigError("evaluate needs at least 2 samples for the FID; raise n_per_digit")
    look = LOOKS[_look_index(style)]
    wanted = [d for d in digits for _ in range(n_per_digit)]
    fake = generate(pipe, [make_prompt(d, None if look == "plain" else look) for d in wanted],
                    steps=steps, seed=seed, guidance_scale=guidance_scale)
    real, _, _ = load_digits_images("heldout", look, digits)
    train, train_labels, _ = load_digits_images("train", look, digits)
    floor_set = torch.cat([train[train_labels == d][:n_per_digit] for d in digits])
    classifier = classifier or load_classifier()
    scores = gated_prompt_agreement(fake, wanted, look, classifier)
    return {"style": look, "n": len(wanted), "fid": fid_analogue(real, fake, classifier),
            "fid_floor": fid_analogue(real, floor_set, classifier),
            "kid": kid_analogue(real, fake, classifier), "kid_floor": kid_analogue(real, floor_set, classifier),
            **{k: scores[k] for k in ("digit_acc", "look_acc", "agreement", "gate_pass", "gated_agreement")},
            "steps": steps, "guidance_scale": guidance_scale, "seed": seed}


def per_digit_recognition(pipe, n_per_digit: int = 20, seed: int = 0, steps: int = EVAL_STEPS,
                          guidance_scale: float = EVAL_GUIDANCE, style: str | None = None, digits=range(10),
                          classifier: ReferenceClassifier | None = None) -> pd.DataFrame:
    """For each digit k, the fraction of samples from ``"a digit k"`` the classifier reads as k.

    The course model's quality bar: a pretrained model worth fine-tuning draws
    every digit recognisably (>= 90% each). ``style`` checks a fine-tuned model's
    styled prompts the same way (content only; see :func:`prompt_agreement` for the look).
    Returns a DataFrame with columns ``digit``, ``n``, ``recognised``.
    """
    from .model import generate
    from .text import make_prompt

    digits = _check_sampling(n_per_digit, steps, digits, seed, guidance_scale)
    look = LOOKS[_look_index(style)]
    wanted = torch.tensor([d for d in digits for _ in range(n_per_digit)])
    images = generate(pipe, [make_prompt(int(d), None if look == "plain" else look) for d in wanted],
                      steps=steps, seed=seed, guidance_scale=guidance_scale)
    pred = (classifier or load_classifier()).predict(images)["digit"]
    return pd.DataFrame([{"digit": d, "n": n_per_digit, "recognised": (pred[wanted == d] == d).float().mean().item()}
                         for d in digits])


__all__ = ["fid_analogue", "kid_analogue", "prompt_agreement", "gated_prompt_agreement", "vlhi", "vlhi_table", "evaluate", "per_digit_recognition",
           "EVAL_STEPS", "EVAL_GUIDANCE"]
