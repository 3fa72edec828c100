"""A quality gate for generated digits: does an image look like *some* real image of its look at all?

Prompt agreement asks the reference classifier which digit and look an image
shows; a classifier always answers, so coloured noise can still be read as
"a 3, cyberpunk" (notebook 04's QUICK LoRA samples scored digit accuracy 0.83).
The gate asks first whether the image is one the classifier's training world
contains, with two checks calibrated on real images:

* **realness**: the Mahalanobis distance of the image's classifier features to
  the nearest (digit, look) class mean, with one covariance shared by the
  classes (fitted on the training split). Noise and pixel-shuffled images land
  far from every class.
* **sharpness**: the mean absolute Laplacian of the pixels, within the band
  real images of that look occupy. Blurred images keep their features (the
  classifier still reads them) but lose the edges every real image of that look
  has (below the band); noise and pixel-shuffled images are all edges (above).

Thresholds: the realness distance at the 99.5th percentile of the *calibration*
half of the held-out real images (all looks), the sharpness band at the 0.5th and
99.5th percentiles per look; the other half (the *validation* half) then measures the
real pass rate (the target: at least 95%), and :func:`gate_report` the pass
rate of corrupted images (the target: at most 5%).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import PromptError
from .classifier import ReferenceClassifier, check_images, load_classifier
from .styles import LOOKS

PER_CLASS = 60  # training images per (digit, look) class for the means and covariance: plenty for 64 features
REAL_TAIL = 0.005  # each of the three bounds rejects this share of the calibration images: together ~1.5%


@dataclass(frozen=True)
class QualityGate:
    """Thresholds and statistics of a calibrated gate (see the module's docstring)."""

    means: torch.Tensor  # (classes, features)
    precision: torch.Tensor  # inverse of the shared covariance
    max_distance: float
    sharpness_band: dict  # look -> (low, high)

    def distance(self, images: torch.Tensor, classifier: ReferenceClassifier) -> torch.Tensor:
        return _nearest_class_distance(classifier.embed(images), self.means, self.precision)

    def passes(self, images: torch.Tensor, looks, classifier: ReferenceClassifier | None = None) -> torch.Tensor:
        """One bool per image: real-looking features *and* the sharpness of its look (one look or one per image)."""
        images = check_images(images)
        classifier = classifier or load_classifier()
        looks = [looks] * len(images) if looks is None or isinstance(looks, str) else list(looks)
        if len(looks) != len(images):
            raise PromptError(f"looks has {len(looks)} entries for {len(images)} images; pass one or one per image")
        looks = ["plain" if lk in (None, "") else str(lk).lower() for lk in looks]
        unknown = sorted(set(looks) - set(LOOKS))
        if unknown:
            raise PromptError(f"unknown look(s) {unknown}; choose from {', '.join(LOOKS)} (None means plain)")
        band = torch.tensor([self.sharpness_band[lk] for lk in looks], dtype=torch.float64)
        sharp = sharpness(images)
        return (self.distance(images, classifier) <= self.max_distance) & (sharp >= band[:, 0]) & (sharp <= band[:, 1])


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian per image (float64): edges; blurring lowers it."""
    images = check_images(images).double()
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64).view(1, 1, 3, 3)
    return F.conv2d(images, lap.repeat(images.shape[1], 1, 1, 1), groups=images.shape[1]).abs().mean((1, 2, 3))


def _nearest_class_distance(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of each feature row to the nearest class mean (shared covariance)."""
    d = features[:, None, :] - means[None]
    return torch.einsum("nkd,de,nke->nk", d, precision, d).min(1).values.clamp_min(0).sqrt()


def heldout_halves(look: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out real images of ``look`` split in two fixed halves: (calibration, validation)."""
    from .data import load_digits_images

    images, _, _ = load_digits_images("heldout", look)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    half = len(images) // 2
    return images[order[:half]], images[order[half:]]


def fit_gate(classifier: ReferenceClassifier | None = None) -> QualityGate:
    """Calibrate the gate on the shipped data (a second or two on a CPU)."""
    from .data import load_digits_images

    classifier = classifier or load_classifier()
    feats, classes = [], []
    for li, look in enumerate(LOOKS):
        images, labels, _ = load_digits_images("train", look)
        keep = torch.cat([(labels == d).nonzero().squeeze(1)[:PER_CLASS] for d in labels.unique()])
        feats.append(classifier.embed(images[keep]))
        classes.append(labels[keep] * len(LOOKS) + li)
    feats, classes = torch.cat(feats), torch.cat(classes)
    keys = classes.unique()
    means = torch.stack([feats[classes == c].mean(0) for c in keys])
    resid = torch.cat([feats[classes == c] - means[i] for i, c in enumerate(keys)])
    # ReLU features that never fire make the covariance singular: a small ridge keeps it invertible
    cov = resid.T @ resid / len(resid) + 1e-6 * torch.eye(feats.shape[1], dtype=feats.dtype)
    precision = torch.linalg.inv(cov)
    calibration = {lk: heldout_halves(lk)[0] for lk in LOOKS}
    dist = torch.cat([_nearest_class_distance(classifier.embed(x), means, precision) for x in calibration.values()])
    return QualityGate(means, precision, float(torch.quantile(dist, 1 - REAL_TAIL)),
                       {lk: _band(sharpness(x)) for lk, x in calibration.items()})


def _band(values: torch.Tensor) -> tuple[float, float]:
    low, high = torch.quantile(values, torch.tensor([REAL_TAIL, 1 - REAL_TAIL], dtype=values.dtype))
    return float(low), float(high)


def load_gate(classifier: ReferenceClassifier | None = None) -> QualityGate:
    """The gate for ``classifier`` (default: the shipped one), fitted once per classifier and process."""
    return _fitted(classifier or load_classifier())


@lru_cache(maxsize=2)  # keyed by the classifier object; load_classifier() returns the same one per file version
def _fitted(classifier: ReferenceClassifier) -> QualityGate:
    return fit_gate(classifier)


def judged_samples(pipe, style: str, digits, *, seed: int = 0, steps: int = 25, guidance_scale: float = 3.0,
                   classifier: ReferenceClassifier | None = None):
    """One sample per digit for ``"a digit k, <style> style"``, each with the gate's verdict and the classifier's
    prompt agreement: ``(images, passed, agrees)``, what a sample grid beside a metric table shows."""
    from .metrics import prompt_agreement
    from .model import generate
    from .text import make_prompt

    classifier = classifier or load_classifier()
    digits = list(digits)
    images = generate(pipe, [make_prompt(d, style) for d in digits], steps=steps, seed=seed,
                      guidance_scale=guidance_scale)
    passed = load_gate(classifier).passes(images, style, classifier)
    agrees = prompt_agreement(images, digits, style, classifier, per_image=True)["agreement"]
    return images, passed, agrees


def verdict_title(passed, agrees) -> str:
    """A sample's title in a grid: the gate's verdict and the classifier's (``"pass ✓"``, ``"reject ✗"``, ...)."""
    return ("pass" if passed else "reject") + (" ✓" if agrees else " ✗")


def corruptions(images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images a person would reject, made from real ones: noise, pixel-shuffled, blurred (3x3 box)."""
    g = torch.Generator().manual_seed(seed)
    n, c = images.shape[:2]
    flat = images.reshape(n, c, -1)
    shuffled = flat[:, :, torch.randperm(flat.shape[-1], generator=g)].reshape(images.shape)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    noise = torch.randn(images.shape, generator=g).clamp(-1, 1)
    return {"noise": noise, "pixel-shuffled": shuffled, "blurred": blurred}


def gate_report(gate: QualityGate | None = None, classifier: ReferenceClassifier | None = None,
                extra: dict | None = None):
    """Pass rates per look: the validation half of the real held-out images and their corruptions.

    ``extra``: ``{name: (images, look)}`` more sets to score (e.g. a model's samples).
    Returns a DataFrame with ``set``, ``look``, ``n``, ``pass_rate``.
    """
    import pandas as pd

    classifier = classifier or load_classifier()
    gate = gate or load_gate(classifier)
    rows = []
    for look in LOOKS:
        real = heldout_halves(look)[1]
        sets = {"real (validation half)": real, **corruptions(real)}
        for name, images in sets.items():
            rows.append({"set": name, "look": look, "n": len(images),
                         "pass_rate": float(gate.passes(images, look, classifier).double().mean())})
    for name, (images, look) in (extra or {}).items():
        rows.append({"set": name, "look": look or "plain", "n": len(images),
                     "pass_rate": float(gate.passes(images, look, classifier).double().mean())})
    return pd.DataFrame(rows)
