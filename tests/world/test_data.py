import json

import pytest
import torch

from sara_edu.errors import DataError, PromptError
from sara_edu.world.data import (
    FINETUNE_DIGITS,
    IMAGE_SIZE,
    ImageFolderDataset,
    StyleDataset,
    export_image_folder,
    load_digits_images,
    load_digits_ink,
)
from sara_edu.world.styles import LOOKS, apply_style


def test_split_is_fixed_stratified_and_disjoint():
    ink_tr, y_tr = load_digits_ink("train")
    ink_ho, y_ho = load_digits_ink("heldout")
    assert len(y_tr) == 1437 and len(y_ho) == 360
    assert ink_tr.shape == (1437, IMAGE_SIZE, IMAGE_SIZE)
    # stratified: every digit is ~20% held out
    for k in range(10):
        frac = (y_ho == k).sum() / ((y_ho == k).sum() + (y_tr == k).sum())
        assert 0.18 < frac < 0.22
    # disjoint: no held-out image equals a training image's index (compare raw pixels of the full set)
    ink_all, _ = load_digits_ink("all")
    assert len(ink_all) == 1797
    tr_set = {tuple(x.flatten().tolist()) for x in ink_tr[:200]}
    assert sum(tuple(x.flatten().tolist()) in tr_set for x in ink_ho) < 5  # a few digits are duplicates in the source


@pytest.mark.parametrize("look", LOOKS)
def test_each_look_is_rgb_in_range_and_distinct(look):
    images, labels, prompts = load_digits_images("train", style=look, digits=[3])
    assert images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.min() >= -1 and images.max() <= 1
    assert all(p.startswith("a digit 3") for p in prompts)
    plain, _, _ = load_digits_images("train", style=None, digits=[3])
    if look != "plain":
        assert (images - plain).abs().mean() > 0.1
        assert look in prompts[0]


def test_styles_are_deterministic_and_seeded():
    ink, _ = load_digits_ink("train")
    a = apply_style(ink[:5], "cyberpunk", seed=1)
    b = apply_style(ink[:5], "cyberpunk", seed=1)
    c = apply_style(ink[:5], "cyberpunk", seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_style_dataset_keeps_unseen_digits_out():
    ds = StyleDataset("hornify", limit_per_digit=5)
    assert len(ds) == 5 * len(FINETUNE_DIGITS)
    assert set(ds.labels.tolist()) == set(FINETUNE_DIGITS)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 16, 16) and "hornify" in item["prompt"]


def test_unknown_style_is_a_clear_error():
    with pytest.raises(PromptError, match="unknown style"):
        StyleDataset("vaporwave")


def test_image_folder_round_trip(tmp_path):
    ds = StyleDataset("elementfire", limit_per_digit=2)
    export_image_folder(ds, tmp_path / "fire")
    rows = [json.loads(l) for l in (tmp_path / "fire" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == len(ds) and rows[0]["text"] == ds[0]["prompt"]
    back = ImageFolderDataset(tmp_path / "fire")
    assert len(back) == len(ds)
    # PNG is 8-bit: values agree to one grey level
    assert (back.images - ds.images).abs().max() <= 2 / 255 + 1e-6
    assert back.prompts == ds.prompts


def test_bad_image_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="metadata.jsonl"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "empty" / "metadata.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(DataError, match="'text'"):
        ImageFolderDataset(bad)
    (bad / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(DataError, match="not in"):
        ImageFolderDataset(bad)
    (bad / "a.png").write_text("not an image")
    with pytest.raises(DataError, match="not an image"):
        ImageFolderDataset(bad)


def test_prior_preservation_mixes_plain_digits_into_a_style_set():
    from sara_edu.errors import DataError
    from sara_edu.world.data import StyleDataset, with_plain_prompts

    style = StyleDataset("cyberpunk", limit_per_digit=4)  # 28 images of digits 0-6
    mixed = with_plain_prompts(style, fraction=0.5, seed=1)
    assert len(mixed) == 28 + 14
    added = mixed.prompts[28:]
    assert all(p.startswith("a digit ") and "style" not in p for p in added)
    assert len({p for p in added}) > 3  # several digits, drawn at random (7-9 included in the plain set)
    assert torch.equal(mixed.images[:28], style.images) and mixed.prompts[:28] == style.prompts
    assert mixed.prompts == with_plain_prompts(style, fraction=0.5, seed=1).prompts  # seeded
    for bad in (0, -1, float("nan"), "half", True):
        with pytest.raises(DataError, match="fraction"):
            with_plain_prompts(style, fraction=bad)


def test_a_file_given_as_the_image_folder_is_told_it_is_a_file(tmp_path):
    folder = export_image_folder(StyleDataset("cyberpunk", digits=[1], limit_per_digit=1), tmp_path / "style")
    with pytest.raises(DataError, match=r"metadata.jsonl is a file, expected a folder holding the images and a "
                                        r"metadata.jsonl: pass its folder \(\S+style\)"):
        ImageFolderDataset(folder / "metadata.jsonl")
