"""The reference classifier: the course's stand-in for Inception (FID) and CLIP (CLIP score).

The paper measures a fine-tuned Stable Diffusion with two pretrained networks:
Inception-v3 features for the FID and CLIP for prompt agreement. Neither knows
16x16 digits, so the course trains its own judge once and ships it: a small CNN
that reads an image (N, 3, 16, 16) in [-1, 1] and answers two questions,

* which digit is it?  (10 classes, the *content* the prompt asked for)
* which look is it?   (6 classes: ``plain`` + the 5 styles, see :data:`sara_edu.world.styles.LOOKS`)

Its penultimate layer, :meth:`ReferenceClassifier.features`, plays the role of
Inception's pool features in the Fréchet distance (:func:`sara_edu.world.metrics.fid_analogue`).

The shipped weights come from ``python -m sara_edu.world.recipes.classifier``; load them with
:func:`load_classifier`.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, DataError
from ..io import load_tensors
from .paths import CLASSIFIER_PATH, check_data_dir
from .styles import LOOKS

N_DIGITS = 10
IMAGE_SHAPE = (3, 16, 16)
CLASSIFIER_CONFIG = {"channels": [24, 48], "feature_dim": 64, "n_digits": N_DIGITS, "n_looks": len(LOOKS)}


def check_images(images, name: str = "images") -> torch.Tensor:
    """Validate a batch of course images and return it as a float CPU tensor.

    The metrics are silent about bad input otherwise (a conv net happily reads a
    (3, 16, 16) image as 3 one-channel images), so we insist on the exact format.
    """
    if not isinstance(images, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor of shape (N, 3, 16, 16), got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        hint = " (add a batch dimension with images[None])" if images.ndim == 3 else ""
        raise DataError(f"{name} must have shape (N, 3, 16, 16) with values in [-1, 1], "
                        f"got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise DataError(f"{name} is empty: pass at least one image")
    images = images.detach().float().cpu()
    if not torch.isfinite(images).all():
        raise DataError(f"{name} contains NaN or infinite values; check the sampler that produced them")
    return images


class ReferenceClassifier(nn.Module):
    """Two-headed CNN: ``forward(images) -> (digit_logits, look_logits)``.

    Two conv stages (16x16 -> 8x8 -> 4x4) feed a small fully connected layer whose
    ReLU output is the shared feature vector; a linear head per question reads it.
    Sharing the features means the Fréchet distance sees both content and look.
    """

    def __init__(self, channels=(24, 48), feature_dim: int = 64, n_digits: int = N_DIGITS,
                 n_looks: int = len(LOOKS)):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(c2 * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.digit_head = nn.Linear(feature_dim, n_digits)
        self.look_head = nn.Linear(feature_dim, n_looks)
        # torchmetrics' FrechetInceptionDistance reads this instead of probing with a 299x299 image
        self.num_features = feature_dim
        self.config = {"channels": list(channels), "feature_dim": feature_dim, "n_digits": n_digits,
                       "n_looks": n_looks}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim): the Inception-pool analogue."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.digit_head(h), self.look_head(h)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Predicted ``digit`` and ``look`` indices (into :data:`LOOKS`) for each image."""
        images = check_images(images)
        was_training = self.training
        self.eval()
        digits, looks = [], []
        for chunk in images.split(batch_size):
            d, l = self(chunk)
            digits.append(d.argmax(1))
            looks.append(l.argmax(1))
        self.train(was_training)
        return {"digit": torch.cat(digits), "look": torch.cat(looks)}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """:meth:`features` for a validated batch of any size, in eval mode, as float64."""
        images = check_images(images)
        was_training = self.training
        self.eval()
        out = torch.cat([self.features(chunk) for chunk in images.split(batch_size)]).double()
        self.train(was_training)
        return out


def build_classifier(config: dict | None = None, seed: int | None = 0) -> ReferenceClassifier:
    """A randomly initialised reference classifier (the shipped architecture by default)."""
    if seed is not None:
        torch.manual_seed(seed)
    cfg = dict(CLASSIFIER_CONFIG, **(config or {}))
    return ReferenceClassifier(tuple(cfg["channels"]), cfg["feature_dim"], cfg["n_digits"], cfg["n_looks"])


def load_classifier(path=None) -> ReferenceClassifier:
    """The shipped reference classifier (or one written by the recipe), on CPU in eval mode.

    Loaded once per file and cached: every metric call shares the same frozen
    model. The cache key includes the file's modification time, so re-running
    the recipe is picked up without restarting the kernel.
    """
    if path is None:
        check_data_dir()
    path = Path(path or CLASSIFIER_PATH)
    if not path.exists():
        raise CheckpointError(f"reference classifier {path} does not exist. Train it with "
                              "`python -m sara_edu.world.recipes.classifier` (about a minute on a CPU).")
    return _load_cached(str(path.resolve()), path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int) -> ReferenceClassifier:
    from .model import load_state_dict_checked

    state, meta = load_tensors(path)
    config = meta.get("classifier_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no 'classifier_config' in its metadata, so it was not written by "
                              "sara_edu.world.recipes.classifier. Re-create it with `python -m sara_edu.world.recipes.classifier`.")
    try:
        model = build_classifier(config, seed=None)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} records an unusable classifier_config {config} ({e})") from e
    load_state_dict_checked(model, state, source=path)
    return model.eval().requires_grad_(False)


__all__ = ["ReferenceClassifier", "CLASSIFIER_CONFIG", "build_classifier", "load_classifier", "check_images"]
