"""Image folders: every Pillow mode is scaled by its own range, and every bad line is named."""
import json

import numpy as np
import pytest
from PIL import Image

from sara_edu.errors import DataError
from sara_edu.world.data import ImageFolderDataset

# A 4x4 grey ramp in [0, 1], exactly representable in 8 bits, so every mode can hold it.
RAMP = (np.arange(16, dtype=np.float64).reshape(4, 4) * 17) / 255.0


def _folder(tmp_path, images: dict, rows=None, meta_bytes: bytes | None = None):
    """Write ``images`` ({file name: PIL image}) and a metadata.jsonl (one row per image by default)."""
    folder = tmp_path / "set"
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / name)
    if meta_bytes is None:
        rows = rows if rows is not None else [{"file_name": n, "text": "a digit 3"} for n in images]
        meta_bytes = "\n".join(json.dumps(r) for r in rows).encode() + b"\n"
    (folder / "metadata.jsonl").write_bytes(meta_bytes)
    return folder


def _pixels(folder, size=4):
    """(H, W, 3) in [0, 1], as the dataset reads them."""
    ds = ImageFolderDataset(folder, size=size)
    return ((ds.images[0].permute(1, 2, 0).double() + 1) / 2).numpy()


def _grey_in(mode: str) -> Image.Image:
    if mode == "L":
        return Image.fromarray(np.round(RAMP * 255).astype(np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.round(RAMP * 65535).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(np.round(RAMP * 65535).astype(np.int32))
    if mode == "F":
        return Image.fromarray(RAMP.astype(np.float32))
    if mode == "LA":
        return Image.merge("LA", (_grey_in("L"), Image.new("L", (4, 4), 255)))
    if mode == "RGBA":
        return _grey_in("L").convert("RGBA")
    if mode == "P":
        pal = Image.new("P", (4, 4))
        pal.putpalette([v for k in range(16) for v in (k * 17,) * 3])
        pal.putdata(list(range(16)))
        return pal
    if mode == "CMYK":  # no ink but black: K = 1 - grey
        k = np.round((1 - RAMP) * 255).astype(np.uint8)
        zero = np.zeros_like(k)
        return Image.fromarray(np.stack([zero, zero, zero, k], -1), "CMYK")
    raise AssertionError(mode)


@pytest.mark.parametrize("mode,suffix", [("L", "png"), ("I;16", "png"), ("I", "tif"), ("F", "tif"), ("LA", "png"),
                                         ("RGBA", "png"), ("P", "png"), ("CMYK", "tif")])
def test_every_mode_is_scaled_by_its_own_range(tmp_path, mode, suffix):
    img = _grey_in(mode)
    assert img.mode == mode
    folder = _folder(tmp_path, {f"a.{suffix}": img})
    assert Image.open(folder / f"a.{suffix}").mode == mode  # the file really stores that mode
    got = _pixels(folder)
    # 16-bit PNGs came out white and float TIFFs black before: the ramp must survive exactly
    np.testing.assert_allclose(got, np.repeat(RAMP[..., None], 3, -1), atol=1e-6)


def test_a_16_bit_image_keeps_its_extra_precision_and_resizes_like_8_bit(tmp_path):
    fine = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    a = _pixels(_folder(tmp_path / "16", {"a.png": Image.fromarray(np.round(fine * 65535).astype(np.uint16))}), 64)
    assert np.unique(a).size > 256  # more grey levels than 8 bits hold
    np.testing.assert_allclose(a[..., 0], np.round(fine * 65535) / 65535, atol=1e-6)
    small16 = _pixels(_folder(tmp_path / "16", {"a.png": Image.fromarray(np.round(fine * 65535).astype(np.uint16))}), 16)
    small8 = _pixels(_folder(tmp_path / "8", {"a.png": Image.fromarray(np.round(fine * 255).astype(np.uint8))}), 16)
    np.testing.assert_allclose(small16, small8, atol=2 / 255)


def test_transparent_pixels_are_white_and_half_transparent_ones_blend(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[0, :, 3] = 255  # opaque first row
    rgba[1, :, 3] = 0  # transparent second row
    rgba[2:, :, 3] = 128
    got = _pixels(_folder(tmp_path, {"a.png": Image.fromarray(rgba, "RGBA")}))
    np.testing.assert_allclose(got[0, 0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(got[1, 0], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(got[2, 0], [1, 127 / 255, 127 / 255], atol=2 / 255)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 4), np.uint8)
    arr[0, :] = 255  # white top row, stored rotated; EXIF orientation 6 = rotate 90 degrees clockwise to view
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = tmp_path / "set"
    folder.mkdir()
    Image.fromarray(arr).save(folder / "a.png", exif=exif)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    got = _pixels(folder)[..., 0]
    assert got[:, -1].min() > 0.99 and got[:, :-1].max() < 0.01  # the top row is now the right column


def test_bom_and_crlf_metadata_just_work(tmp_path):
    img = _grey_in("L")
    meta = b"\xef\xbb\xbf" + '{"file_name": "a.png", "text": "caf\u00e9 digit"}\r\n'.encode()
    ds = ImageFolderDataset(_folder(tmp_path, {"a.png": img}, meta_bytes=meta), size=4)
    assert ds.prompts == ["caf\u00e9 digit"]


def test_names_inside_the_folder_and_symlinks_in_it_are_fine(tmp_path):
    outside = tmp_path / "elsewhere.png"
    _grey_in("L").save(outside)
    folder = _folder(tmp_path, {"sub/a.png": _grey_in("L")},
                     rows=[{"file_name": "sub/../sub/a.png", "text": "x"}, {"file_name": "link.png", "text": "y"}])
    (folder / "link.png").symlink_to(outside)  # the Hugging Face cache stores files as such links
    assert len(ImageFolderDataset(folder, size=4)) == 2


def _truncated_png(folder):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "bad.png")
    data = (folder / "bad.png").read_bytes()
    (folder / "bad.png").write_bytes(data[: len(data) // 2])


def _float_tiff(values):
    def write(folder):
        Image.fromarray(np.asarray(values, np.float32)).save(folder / "bad.tif")
    return write


def _int_tiff(folder):
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(folder / "bad.tif")


@pytest.mark.parametrize("write,name,msg", [
    (_truncated_png, "bad.png", r"bad\.png.*(truncated|cannot be read)"),
    (_float_tiff([[0.0, 2.0], [0.5, 1.0]]), "bad.tif", r"bad\.tif.*0\.\.2.*\[0, 1\]"),
    (_float_tiff([[0.0, float("nan")], [0.5, 1.0]]), "bad.tif", r"bad\.tif.*1 NaN"),
    (_int_tiff, "bad.tif", r"bad\.tif.*70000.*0\.\.65535"),
    (lambda folder: (folder / "bad.png").write_text("not an image"), "bad.png", r"bad\.png.*not an image"),
    (lambda folder: (folder / "bad.png").mkdir(), "bad.png", r"bad\.png.*cannot be read"),
])
def test_unreadable_images_name_the_file(tmp_path, write, name, msg):
    folder = tmp_path / "set"
    folder.mkdir()
    write(folder)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(DataError, match=msg):
        ImageFolderDataset(folder)


@pytest.mark.parametrize("meta,msg", [
    (b'{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "caf\xe9"}\n',
     r"metadata\.jsonl:2 is not valid UTF-8 \(byte 0xe9"),
    ('{"file_name": "a.png", "text": "x"}\n'.encode("utf-16"), "UTF-16"),
    (b'{"file_name": "a.png", "text": "x"\n', r"metadata\.jsonl:1 is not valid JSON"),
    (b'["a.png", "x"]\n', r"metadata\.jsonl:1 must be a JSON object"),
    (b'{"file_name": null, "text": "x"}\n', r":1: 'file_name' must be a non-empty string"),
    (b'{"file_name": "", "text": "x"}\n', r":1: 'file_name' must be a non-empty string"),
    (b'{"file_name": "  ", "text": "x"}\n', r":1: 'file_name' must be a non-empty string"),
    (b'{"file_name": 7, "text": "x"}\n', r":1: 'file_name' must be a non-empty string"),
    (b'{"file_name": "a.png", "text": null}\n', r":1: 'text' must be a string"),
    (b'{"file_name": "a.png", "text": 3}\n', r":1: 'text' must be a string"),
    (b'{"file_name": "a.png", "text": ["x"]}\n', r":1: 'text' must be a string"),
    (b'{"file_name": "a.png"}\n', r":1 has no 'text' key"),
    (b'{"file_name": "../outside.png", "text": "x"}\n', r":1: file_name '\.\./outside\.png' points outside"),
    (b'{"file_name": "sub/../../outside.png", "text": "x"}\n', r"points outside"),
    (b'{"file_name": "..", "text": "x"}\n', r"points outside"),
    (None, r"is an absolute path"),  # the absolute path of a real image outside the folder
])
def test_bad_metadata_lines_are_named_and_nothing_outside_is_read(tmp_path, meta, msg):
    outside = tmp_path / "outside.png"
    _grey_in("L").save(outside)  # a readable image: reading it would succeed, so an error proves we refused
    if meta is None:
        meta = json.dumps({"file_name": str(outside), "text": "x"}).encode() + b"\n"
    folder = _folder(tmp_path, {"a.png": _grey_in("L")}, meta_bytes=meta)
    with pytest.raises(DataError, match=msg):
        ImageFolderDataset(folder)


@pytest.mark.parametrize("kwargs,msg", [({"size": 0}, "size must be >= 1"), ({"size": 2.5}, "size must be an integer"),
                                        ({"caption_column": None}, "caption_column")])
def test_bad_dataset_arguments(tmp_path, kwargs, msg):
    from sara_edu.errors import SaraEduError

    with pytest.raises(SaraEduError, match=msg):
        ImageFolderDataset(_folder(tmp_path, {"a.png": _grey_in("L")}), **kwargs)
