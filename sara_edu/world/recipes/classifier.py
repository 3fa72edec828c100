"""Recipe: train the reference classifier (the shipped ``data/classifier/classifier.safetensors``).

    python -m sara_edu.world.recipes.classifier        # the shipped run (~45 s of CPU; < 2 min on a busy 2-core box)
    python -m sara_edu.world.recipes.classifier --epochs 1 --out /tmp/c.safetensors   # a smoke run

The classifier learns both questions at once (digit and look) on the *train*
split of all six looks; the held-out split is kept for measuring it. The
augmentation is there for the images it will actually judge, which are samples
from a small diffusion model rather than clean renders: they are a pixel off
centre, a bit noisy, their palette drifts. So every batch is shifted by up to
``shift`` pixels, gets Gaussian noise of a random strength up to ``noise``, and
each epoch re-renders the styles with a fresh palette jitter.

The file records the recipe (so a test can check the shipped weights came from
these defaults) and the held-out accuracies it reached.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import ConfigError
from ...io import save_tensors
from ..classifier import CLASSIFIER_CONFIG, ReferenceClassifier, build_classifier
from ..data import load_digits_images
from ..paths import CLASSIFIER_PATH
from ..styles import LOOKS

DEFAULTS = {"epochs": 10, "batch_size": 128, "lr": 3e-3, "weight_decay": 1e-4, "shift": 1, "noise": 0.15,
            "seed": 0}


def augment(images: torch.Tensor, shift: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` px (edges replicated) plus Gaussian noise of random strength."""
    n, _, h, w = images.shape
    if shift > 0:
        padded = F.pad(images, (shift,) * 4, mode="replicate")
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 3, h, w)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 3, h, w)
        # per-image crop of the padded batch: advanced indexing picks rows/cols shifted by (dy, dx)
        images = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    if noise > 0:
        sigma = noise * torch.rand(n, 1, 1, 1, generator=generator)
        images = images + sigma * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1)


def training_set(split: str = "train", seed: int = 0, limit_per_look: int | None = None):
    """All six looks of ``split``: images, digit labels, look labels (indices into LOOKS)."""
    images, digits, looks = [], [], []
    for i, look in enumerate(LOOKS):
        x, y, _ = load_digits_images(split, look, seed=seed)
        if limit_per_look is not None:
            x, y = x[:limit_per_look], y[:limit_per_look]
        images.append(x)
        digits.append(y)
        looks.append(torch.full_like(y, i))
    return torch.cat(images), torch.cat(digits), torch.cat(looks)


@torch.no_grad()
def heldout_report(model: ReferenceClassifier, seed: int = 0) -> pd.DataFrame:
    """Digit and look accuracy on the held-out split, one row per look."""
    rows = []
    for i, look in enumerate(LOOKS):
        x, y, _ = load_digits_images("heldout", look, seed=seed)
        pred = model.predict(x)
        rows.append({"look": look, "n": len(y), "digit_acc": (pred["digit"] == y).float().mean().item(),
                     "look_acc": (pred["look"] == i).float().mean().item()})
    return pd.DataFrame(rows)


def train_classifier(out=CLASSIFIER_PATH, epochs: int = DEFAULTS["epochs"], batch_size: int = DEFAULTS["batch_size"],
                     lr: float = DEFAULTS["lr"], weight_decay: float = DEFAULTS["weight_decay"],
                     shift: int = DEFAULTS["shift"], noise: float = DEFAULTS["noise"], seed: int = DEFAULTS["seed"],
                     limit_per_look: int | None = None, progress: bool = True):
    """Run the recipe; return ``(model, heldout_report)``. Writes ``out`` atomically unless it is None.

    ``limit_per_look`` trains on the first images of each look only (for smoke tests).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or shift < 0 or noise < 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0, shift >= 0, noise >= 0; got "
                          f"epochs={epochs}, batch_size={batch_size}, lr={lr}, shift={shift}, noise={noise}")
    recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, shift=shift,
                  noise=noise, seed=seed)
    model = build_classifier(CLASSIFIER_CONFIG, seed=seed)
    g = torch.Generator().manual_seed(seed)
    per_look = len(load_digits_images("train")[1])
    per_look = per_look if limit_per_look is None else min(per_look, limit_per_look)
    steps_per_epoch = -(-len(LOOKS) * per_look // batch_size)  # ceil: the last batch may be short
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15)
    t0 = time.time()
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", disable=not progress)
    for epoch in range(epochs):
        # a fresh palette jitter each epoch, so the look head learns the style, not one palette
        images, digits, looks = training_set("train", seed=seed + epoch, limit_per_look=limit_per_look)
        order = torch.randperm(len(images), generator=g)
        for idx in order.split(batch_size):
            x = augment(images[idx], shift, noise, g)
            digit_logits, look_logits = model(x)
            loss = F.cross_entropy(digit_logits, digits[idx]) + F.cross_entropy(look_logits, looks[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval().requires_grad_(False)
    report = heldout_report(model)
    if out is not None:
        save_tensors(model.state_dict(), Path(out), {
            "classifier_config": model.config, "recipe": recipe, "looks": list(LOOKS),
            "train_seconds": round(time.time() - t0, 1), "limit_per_look": limit_per_look,
            "heldout": report.to_dict(orient="records"), "torch": torch.__version__})
    return model, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(CLASSIFIER_PATH))
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    t0 = time.time()
    _, report = train_classifier(out=a.out, **{k: getattr(a, k) for k in DEFAULTS})
    print(report.to_string(index=False))
    print(json.dumps({"out": a.out, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
