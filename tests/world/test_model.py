import json

import pytest
import torch

from sara_edu.errors import CheckpointError, ConfigError
from sara_edu.world.model import (
    TINY_UNET_CONFIG,
    TinyDiffusion,
    build_unet,
    generate,
    load_pretrained,
    save_pretrained,
)
from sara_edu.world.text import TinyTextEncoder


def test_course_unet_has_stable_diffusion_anatomy(tiny_pipe):
    unet = tiny_pipe.unet
    n = sum(p.numel() for p in unet.parameters())
    assert 1e6 < n < 3e6  # "a few million parameters at most"
    kinds = {type(b).__name__ for b in unet.down_blocks} | {type(b).__name__ for b in unet.up_blocks}
    assert {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D"} <= kinds
    out = unet(torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), tiny_pipe.encode(["a digit 1", ""])).sample
    assert out.shape == (2, 3, 16, 16)


def test_generate_is_seeded_per_image(tiny_pipe):
    a = generate(tiny_pipe, ["a digit 1", "a digit 2"], steps=2, seed=5)
    b = generate(tiny_pipe, ["a digit 1"], steps=2, seed=5)
    assert a.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(a[:1], b, atol=1e-5)  # same seed, same image, whatever the batch
    assert not torch.allclose(a, generate(tiny_pipe, ["a digit 1", "a digit 2"], steps=2, seed=6))
    with pytest.raises(ConfigError):
        generate(tiny_pipe, ["a digit 1"], steps=0)


def test_save_load_round_trip(tmp_path, tiny_pipe):
    save_pretrained(tiny_pipe, tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    for (k, v), (k2, v2) in zip(tiny_pipe.unet.state_dict().items(), back.unet.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = generate(tiny_pipe, ["a digit 4"], steps=2)
    assert torch.equal(x, generate(back, ["a digit 4"], steps=2))


def test_missing_corrupt_and_mismatched_checkpoints(tmp_path, tiny_pipe):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "nothing")
    folder = save_pretrained(tiny_pipe, tmp_path / "m")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_pretrained(folder, checkpoint="step_999")
    # corrupt weights
    (folder / "unet.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError):
        load_pretrained(folder)
    # weights from a model with another config
    other = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)
    save_pretrained(TinyDiffusion(build_unet(other), TinyTextEncoder()), tmp_path / "other")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))  # config says the course model
    with pytest.raises(CheckpointError, match="shapes differ"):
        load_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid"):
        load_pretrained(tmp_path / "other")


def _damage(path, n_bytes=1000):
    """What a bad disk or copy does: the last ``n_bytes`` of the file (the tensor data) set to 0xFF."""
    data = bytearray(path.read_bytes())
    data[-n_bytes:] = b"\xff" * n_bytes
    path.write_bytes(bytes(data))


def test_a_damaged_weights_file_is_refused_naming_the_file_the_count_and_the_tensor(tmp_path, tiny_pipe):
    folder = save_pretrained(tiny_pipe, tmp_path / "m")
    _damage(folder / "unet.safetensors")  # 1000 bytes of 0xFF: 250 float32 NaN, the header still valid
    with pytest.raises(CheckpointError, match=r"unet\.safetensors holds 250 NaN or infinite values in 1 tensor: "
                                              r"\S+ \(250 of [\d,]+\)\. The file is damaged.*re-create it"):
        load_pretrained(folder)
    folder = save_pretrained(tiny_pipe, tmp_path / "m2")
    _damage(folder / "text_encoder.safetensors", 8)
    with pytest.raises(CheckpointError, match=r"text_encoder\.safetensors holds 2 NaN"):
        load_pretrained(folder)


def test_save_pretrained_refuses_non_finite_weights_and_keeps_the_saved_files(tmp_path, tiny_pipe):
    folder = save_pretrained(tiny_pipe, tmp_path / "m")
    before = (folder / "unet.safetensors").read_bytes()
    with torch.no_grad():
        tiny_pipe.unet.conv_in.weight[0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
        tiny_pipe.text_encoder.token.weight[1, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refuses to write .*m: the model holds 3 NaN or infinite values "
                                              r"in 2 tensors: conv_in.weight \(2 of 864\), text_encoder.token.weight \(1 of"):
        save_pretrained(tiny_pipe, folder)
    assert (folder / "unet.safetensors").read_bytes() == before


def test_a_file_given_as_the_model_folder_is_told_it_is_a_file(tmp_path, tiny_pipe):
    folder = save_pretrained(tiny_pipe, tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"unet.safetensors is a file, expected the model's folder .*pass \S+m "):
        load_pretrained(folder / "unet.safetensors")
