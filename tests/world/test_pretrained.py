"""The shipped course model: it came from the committed recipe, and it is good enough to fine-tune."""
import json

import pandas as pd
import pytest

from sara_edu.world.model import list_checkpoints, load_pretrained
from sara_edu.world.paths import PRETRAINED_DIR
from sara_edu.world.recipes.pretrain import DEFAULTS, pretrain


def test_shipped_files_and_size():
    names = {p.name for p in PRETRAINED_DIR.iterdir()}
    assert {"config.json", "unet.safetensors", "text_encoder.safetensors", "train_log.csv"} <= names
    assert (PRETRAINED_DIR / "unet.safetensors").stat().st_size < 10 * 2**20  # "a few MB"
    ckpts = list_checkpoints()
    assert 3 <= len(ckpts) <= 5
    steps = [int(c.split("_")[1]) for c in ckpts]
    assert steps == sorted(steps) and steps[-1] < DEFAULTS["steps"]
    early = load_pretrained(checkpoint=ckpts[0])
    final = load_pretrained()
    diff = [(a - b).abs().max().item() for a, b in zip(early.unet.parameters(), final.unet.parameters())]
    assert max(diff) > 1e-2  # intermediate checkpoints are really earlier weights


def test_shipped_config_is_the_recipe():
    config = json.loads((PRETRAINED_DIR / "config.json").read_text())
    recipe = dict(config["recipe"])
    assert recipe == {**DEFAULTS, "checkpoint_fractions": list(DEFAULTS["checkpoint_fractions"])}


def test_recipe_reproduces_the_logged_first_steps():
    # Re-run the first steps of the recipe with its defaults: the losses must match the shipped log,
    # so the shipped weights came from this code, data and seed.
    logged = pd.read_csv(PRETRAINED_DIR / "train_log.csv")
    history = pretrain(out=None, stop_after=3, progress=False)
    assert history.loss.tolist() == pytest.approx(logged.loss.head(3).tolist(), rel=2e-3)


def test_every_digit_is_recognised_at_least_90_percent():
    from sara_edu.world.metrics import per_digit_recognition

    pipe = load_pretrained()
    table = per_digit_recognition(pipe, n_per_digit=20, seed=0)
    assert len(table) == 10
    worst = table.loc[table.recognised.idxmin()]
    assert worst.recognised >= 0.9, f"digit {worst.digit} recognised only {worst.recognised:.0%}:\n{table}"
