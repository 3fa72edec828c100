"""The reference classifier: shipped accuracy, loading errors, and the recipe."""
import pytest
import torch

from sara_edu.errors import CheckpointError, ConfigError, DataError
from sara_edu.io import read_metadata, save_tensors
from sara_edu.world.classifier import build_classifier, check_images, load_classifier
from sara_edu.world.data import load_digits_images
from sara_edu.world.paths import CLASSIFIER_PATH
from sara_edu.world.recipes import classifier as recipe
from sara_edu.world.styles import LOOKS

shipped = pytest.mark.skipif(not CLASSIFIER_PATH.exists(), reason="run `python -m sara_edu.world.recipes.classifier`")


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@shipped
def test_digit_accuracy_on_plain_heldout_images(clf):
    x, y, _ = load_digits_images("heldout", "plain")
    assert len(y) == 360  # the held-out split, never seen in training
    acc = (clf.predict(x)["digit"] == y).float().mean().item()
    assert acc >= 0.97


@shipped
@pytest.mark.parametrize("look", LOOKS)
def test_look_and_digit_accuracy_on_every_heldout_look(clf, look):
    x, y, _ = load_digits_images("heldout", look, seed=123)  # a palette jitter not used in training
    pred = clf.predict(x)
    assert (pred["look"] == LOOKS.index(look)).float().mean().item() >= 0.99
    assert (pred["digit"] == y).float().mean().item() >= 0.90


@shipped
def test_shipped_file_records_recipe_defaults_and_its_heldout_scores():
    meta = read_metadata(CLASSIFIER_PATH)
    assert meta["recipe"] == recipe.DEFAULTS
    assert meta["limit_per_look"] is None
    assert meta["looks"] == list(LOOKS)
    plain = next(r for r in meta["heldout"] if r["look"] == "plain")
    assert plain["digit_acc"] >= 0.97


@shipped
def test_load_is_cached_eval_mode_and_frozen(clf):
    assert load_classifier() is clf
    assert not clf.training
    assert not any(p.requires_grad for p in clf.parameters())
    assert clf.features(torch.zeros(2, 3, 16, 16)).shape == (2, clf.num_features)


def test_missing_corrupt_and_mismatched_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="recipes.classifier"):
        load_classifier(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_classifier(bad)
    other = build_classifier({"feature_dim": 32})
    # weights of a different width but the default config recorded: shapes disagree
    save_tensors(other.state_dict(), tmp_path / "mismatch.safetensors",
                 {"classifier_config": build_classifier().config})
    with pytest.raises(CheckpointError, match="does not match"):
        load_classifier(tmp_path / "mismatch.safetensors")
    save_tensors(other.state_dict(), tmp_path / "noconfig.safetensors")
    with pytest.raises(CheckpointError, match="classifier_config"):
        load_classifier(tmp_path / "noconfig.safetensors")


@pytest.mark.parametrize("bad", [torch.zeros(0, 3, 16, 16), torch.zeros(3, 16, 16), torch.zeros(2, 1, 16, 16),
                                 torch.zeros(2, 3, 8, 8), torch.full((1, 3, 16, 16), float("nan")), [[0.0]]])
def test_bad_images_are_rejected_with_a_clear_error(bad):
    with pytest.raises(DataError, match="images"):
        check_images(bad)


def test_augment_shifts_by_at_most_one_pixel_and_keeps_range():
    x = torch.zeros(64, 3, 16, 16) - 1
    x[:, :, 7:9, 7:9] = 1  # a 2x2 blob in the centre
    y = recipe.augment(x, shift=1, noise=0.0, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert torch.equal((y > 0).flatten(1).sum(1), torch.full((64,), 12))  # blob moved, not destroyed
    rows = (y[:, 0] > 0).any(2).float().argmax(1)
    cols = (y[:, 0] > 0).any(1).float().argmax(1)
    assert set(rows.tolist()) == {6, 7, 8} and set(cols.tolist()) == {6, 7, 8}


def test_tiny_recipe_run_writes_a_loadable_file(tmp_path):
    out = tmp_path / "clf.safetensors"
    model, report = recipe.train_classifier(out=out, epochs=1, limit_per_look=64, progress=False)
    assert out.exists() and not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary left behind
    meta = read_metadata(out)
    assert meta["recipe"]["epochs"] == 1 and meta["limit_per_look"] == 64
    assert list(report.look) == list(LOOKS)
    loaded = load_classifier(out)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_recipe_rejects_impossible_settings(tmp_path):
    with pytest.raises(ConfigError):
        recipe.train_classifier(out=tmp_path / "x.safetensors", epochs=0, progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_accepts_out_and_epochs(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(recipe, "train_classifier", lambda **kw: (seen.update(kw), (None, recipe.pd.DataFrame()))[1])
    recipe.main(["--out", str(tmp_path / "c.safetensors"), "--epochs", "2"])
    assert seen["out"] == str(tmp_path / "c.safetensors") and seen["epochs"] == 2
    assert {k: seen[k] for k in recipe.DEFAULTS if k != "epochs"} == {k: v for k, v in recipe.DEFAULTS.items()
                                                                      if k != "epochs"}
