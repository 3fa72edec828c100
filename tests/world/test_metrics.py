"""The course's FID, CLIP-score and VLHI analogues, checked against independent references."""
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

from sara_edu.errors import ConfigError, DataError, PromptError
from sara_edu.world.classifier import load_classifier
from sara_edu.world.data import load_digits_images
from sara_edu.world.metrics import (
    evaluate,
    fid_analogue,
    kid_analogue,
    per_digit_recognition,
    prompt_agreement,
    vlhi,
    vlhi_table,
)
from sara_edu.world.paths import CLASSIFIER_PATH

pytestmark = pytest.mark.skipif(not CLASSIFIER_PATH.exists(), reason="run `python -m sara_edu.world.recipes.classifier`")


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook Fréchet distance by a different route than torchmetrics' eigvals(S_a S_b).

    Tr((S_a S_b)^½) = Tr((A S_b A)^½) with A = S_a^½, and A S_b A is symmetric
    positive semi-definite, so scipy's ``eigh`` gives its root stably even when the
    covariances are singular (ReLU features that never fire).
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = scipy.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    trace_root = np.sqrt(scipy.linalg.eigh(root_a @ s_b @ root_a, eigvals_only=True).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)


# --- FID analogue ---------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero(clf):
    x, _, _ = load_digits_images("heldout", "plain")
    assert fid_analogue(x, x, clf) == pytest.approx(0.0, abs=1e-3)


def test_fid_matches_a_scipy_reference(clf):
    real, _, _ = load_digits_images("heldout", "plain")
    fake, _, _ = load_digits_images("train", "plain", digits=range(5))
    expected = scipy_frechet(clf.embed(real).numpy(), clf.embed(fake).numpy())
    assert fid_analogue(real, fake, clf) == pytest.approx(expected, rel=1e-3)


def test_fid_grows_with_the_distribution_shift(clf):
    real, _, _ = load_digits_images("heldout", "cyberpunk")
    other_half, _, _ = load_digits_images("train", "cyberpunk")
    g = torch.Generator().manual_seed(0)
    noisy = lambda s: (other_half + s * torch.randn(other_half.shape, generator=g)).clamp(-1, 1)  # noqa: E731
    same_look = fid_analogue(real, other_half, clf)
    slightly, very = fid_analogue(real, noisy(0.3), clf), fid_analogue(real, noisy(0.8), clf)
    plain, _, _ = load_digits_images("train", "plain")
    other_look = fid_analogue(real, plain, clf)
    assert same_look < slightly < very
    assert other_look > 10 * same_look


# --- KID analogue ---------------------------------------------------------------------------

def brute_force_kid(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased MMD² with the cubic kernel, by explicit loops over pairs (a different route)."""
    d = a.shape[1]
    k = lambda x, y: (float(x @ y) / d + 1.0) ** 3  # noqa: E731
    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_brute_force_reference_on_unequal_sets(clf):
    real, _, _ = load_digits_images("heldout", "cyberpunk", digits=range(3))
    fake, _, _ = load_digits_images("train", "plain", digits=range(2))
    real, fake = real[:40], fake[:17]
    expected = brute_force_kid(clf.embed(real).double().numpy(), clf.embed(fake).double().numpy())
    assert kid_analogue(real, fake, clf) == pytest.approx(expected, rel=1e-9)


def test_kid_is_unbiased_where_fid_is_not(clf):
    """Two small real sets of the same look: KID averages ~0 at any size, FID stays far above 0."""
    real, _, _ = load_digits_images("heldout", "cyberpunk")
    train, _, _ = load_digits_images("train", "cyberpunk")
    g = torch.Generator().manual_seed(0)
    kids, fids = [], []
    for _ in range(8):
        pick = train[torch.randperm(len(train), generator=g)[:20]]
        kids.append(kid_analogue(real, pick, clf))
        fids.append(fid_analogue(real, pick, clf))
    plain, _, _ = load_digits_images("train", "plain")
    other = kid_analogue(real, plain[:20], clf)
    spread = np.std(kids, ddof=1) / np.sqrt(len(kids))
    assert abs(np.mean(kids)) < 3 * spread + 1e-3 * other  # 0 in expectation
    assert other > 20 * max(abs(np.mean(kids)), spread)  # another look is far away
    assert min(fids) > 0.1 * fid_analogue(real, plain[:20], clf)  # the small-sample FID bias


def test_fid_rejects_bad_input(clf):
    x = torch.zeros(4, 3, 16, 16)
    with pytest.raises(DataError, match="empty"):
        fid_analogue(torch.zeros(0, 3, 16, 16), x, clf)
    with pytest.raises(DataError, match="at least 2"):
        kid_analogue(x[:1], x, clf)
    with pytest.raises(DataError, match="at least 2"):
        fid_analogue(x, x[:1], clf)
    with pytest.raises(DataError, match=r"\(N, 3, 16, 16\)"):
        fid_analogue(x, torch.zeros(4, 16, 16), clf)


# --- prompt agreement (CLIP-score analogue) -------------------------------------------------

@pytest.mark.parametrize("style", [None, "barbiecore", "cyberpunk", "elementfire", "expedition", "hornify"])
def test_real_styled_images_agree_with_their_own_prompts(clf, style):
    x, y, _ = load_digits_images("heldout", style)
    scores = prompt_agreement(x, y, style, clf)
    assert scores["look_acc"] >= 0.99 and scores["agreement"] >= 0.9 and scores["n"] == len(y)


def test_agreement_is_low_when_look_or_digit_is_wrong(clf):
    x, y, _ = load_digits_images("heldout", "plain")
    wrong_look = prompt_agreement(x, y, "cyberpunk", clf)
    assert wrong_look["digit_acc"] >= 0.95 and wrong_look["look_acc"] <= 0.02 and wrong_look["agreement"] <= 0.02
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    wrong_digit = prompt_agreement(x, shuffled, None, clf)
    assert wrong_digit["look_acc"] >= 0.99 and wrong_digit["agreement"] <= 0.25


def test_agreement_takes_per_image_styles(clf):
    a, ya, _ = load_digits_images("heldout", "plain", digits=[3])
    b, yb, _ = load_digits_images("heldout", "hornify", digits=[3])
    x = torch.cat([a, b])
    styles = ["plain"] * len(a) + ["hornify"] * len(b)
    assert prompt_agreement(x, 3, styles, clf)["agreement"] >= 0.9
    assert prompt_agreement(x, 3, styles[::-1], clf)["look_acc"] <= 0.6


def test_agreement_rejects_bad_input(clf):
    x = torch.zeros(3, 3, 16, 16)
    with pytest.raises(DataError, match="3 images"):
        prompt_agreement(x, [1, 2], None, clf)
    with pytest.raises(DataError, match="0..9"):
        prompt_agreement(x, 12, None, clf)
    with pytest.raises(PromptError, match="unknown style"):
        prompt_agreement(x, 1, "vaporwave", clf)
    with pytest.raises(DataError, match="empty"):
        prompt_agreement(torch.zeros(0, 3, 16, 16), [], None, clf)


# --- VLHI -----------------------------------------------------------------------------------

def test_vlhi_on_a_hand_computed_table():
    df = pd.DataFrame({"method": ["a", "b", "c"], "fid": [10.0, 20.0, 30.0], "agreement": [0.5, 0.9, 0.7]})
    out = vlhi_table(df)
    # a: best FID (1) + worst CLIP (0); b: 0.5 + 1; c: worst FID (0) + 0.5
    np.testing.assert_allclose(out.vlhi, [1.0, 1.5, 0.5])
    assert "vlhi" not in df.columns  # a copy, the input is untouched


def test_vlhi_reproduces_the_papers_table_1():
    """SD 1.5 / BarbieCore column of the paper's Table 1: all 13 rows normalised together."""
    fid = [161.88, 166.09, 157.80, 148.54, 159.64, 159.02, 156.60, 153.68, 163.80, 164.22, 169.24, 153.69, 147.81]
    clip = [29.93, 29.00, 23.80, 28.60, 29.65, 29.08, 23.76, 29.33, 29.93, 29.37, 24.23, 29.39, 27.77]
    published = [1.34, 1.00, 0.54, 1.75, 1.40, 1.34, 0.59, 1.63, 1.25, 1.14, 0.08, 1.64, 1.65]
    np.testing.assert_allclose(vlhi(fid, clip), published, atol=0.006)


def test_vlhi_table_normalises_within_groups_and_handles_ties():
    df = pd.DataFrame({"style": ["x", "x", "y", "y"], "fid": [1.0, 2.0, 5.0, 5.0], "clip": [0.1, 0.2, 0.3, 0.9]})
    out = vlhi_table(df, clip_col="clip", by="style")
    np.testing.assert_allclose(out.vlhi, [1.0, 1.0, 0.5, 1.5])  # FID ties in group y: 0.5 each


def test_vlhi_rejects_bad_tables():
    with pytest.raises(DataError, match="columns"):
        vlhi_table(pd.DataFrame({"fid": [1.0]}), clip_col="clip")
    with pytest.raises(DataError, match="non-empty"):
        vlhi_table(pd.DataFrame({"fid": [], "agreement": []}))
    with pytest.raises(DataError, match="NaN"):
        vlhi([1.0, np.nan], [0.1, 0.2])


# --- evaluate / per-digit recognition on a tiny random model (format only) -------------------

def test_evaluate_returns_one_row_of_metrics(tiny_pipe, clf):
    row = evaluate(tiny_pipe, style="cyberpunk", digits=[0, 1], n_per_digit=2, steps=1, classifier=clf)
    assert row["style"] == "cyberpunk" and row["n"] == 4 and row["fid"] > row["fid_floor"] > 0
    assert all(0 <= row[k] <= 1 for k in ("digit_acc", "look_acc", "agreement"))
    assert list(vlhi_table(pd.DataFrame([row, {**row, "fid": 0.0}])).vlhi) == [0.5, 1.5]


def test_per_digit_recognition_table(tiny_pipe, clf):
    df = per_digit_recognition(tiny_pipe, n_per_digit=1, steps=1, digits=[2, 7], classifier=clf)
    assert list(df.columns) == ["digit", "n", "recognised"] and list(df.digit) == [2, 7]
    assert df.recognised.between(0, 1).all()


def test_sampling_settings_are_checked(tiny_pipe, clf):
    with pytest.raises(ConfigError):
        evaluate(tiny_pipe, n_per_digit=0, classifier=clf)
    with pytest.raises(DataError, match="0..9"):
        per_digit_recognition(tiny_pipe, digits=[10], classifier=clf)
    with pytest.raises(PromptError):
        evaluate(tiny_pipe, style="vaporwave", classifier=clf)
