"""A malformed config.json value is named (file and key), never passed raw to diffusers or transformers."""
import json
import shutil

import pytest

from sara_edu.errors import CheckpointError
from sara_edu.world.model import (
    TinyDiffusion,
    build_unet,
    load_pretrained,
    save_pretrained,
)
from sara_edu.world.text import TinyTextEncoder


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_pretrained(TinyDiffusion(build_unet(seed=0), TinyTextEncoder()), tmp_path_factory.mktemp("m") / "m")


def _edit(src, dst, change):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _set(section, key, value):
    return lambda c: c[section].__setitem__(key, value)


@pytest.mark.parametrize("change,msg", [
    (_set("unet", "block_out_channels", "abc"), r"\['unet'\]: block_out_channels='abc' is not valid.*expected"),
    (_set("unet", "block_out_channels", [32, "64", 64]), r"block_out_channels=\[32, '64', 64\] is not valid"),
    (_set("unet", "in_channels", 3.0), r"in_channels=3\.0 is not valid.*expected int, got float"),
    (_set("unet", "sample_size", "x"), r"sample_size='x' is not valid"),
    (_set("unet", "layers_per_block", -1), r"layers_per_block=-1 .*cannot be negative"),
    (_set("unet", "norm_num_groups", 0), r"norm_num_groups=0 cannot build UNet2DConditionModel \(ZeroDivisionError"),
    (_set("unet", "down_block_types", ["DownBlock2D", "NoSuchBlock2D", "DownBlock2D"]),
     r"down_block_types=.*NoSuchBlock2D.* cannot build"),
    (_set("unet", "layer_per_block", 2), r"key 'layer_per_block' is not a setting of UNet2DConditionModel"),
    (_set("scheduler", "beta_schedule", "cosine"), r"\['scheduler'\]: beta_schedule='cosine' is not valid.*Literal"),
    (_set("scheduler", "num_train_timesteps", "1000"), r"num_train_timesteps='1000' is not valid"),
    (lambda c: c.__setitem__("unet", [1, 2]), r"key 'unet' must be a JSON object of settings, got list"),
    (lambda c: c.pop("unet"), r"key 'unet' must be a JSON object of settings, got nothing"),
    (lambda c: c.__setitem__("scheduler", "ddpm"), r"key 'scheduler' must be a JSON object"),
])
def test_bad_course_config_values_name_the_file_and_key(saved_model, tmp_path, change, msg):
    folder = _edit(saved_model, tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=msg) as e:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(e.value)


@pytest.mark.parametrize("content,msg", [(b"[1, 2]", "must hold a JSON object of settings, got list"),
                                         (b'{"unet": "\xff"}', "is not UTF-8 text"),
                                         (b'{"unet": {', r"is not a valid JSON file \(line 1, column 11")])
def test_unreadable_course_configs(saved_model, tmp_path, content, msg):
    folder = tmp_path / "bad"
    shutil.copytree(saved_model, folder)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=msg):
        load_pretrained(folder)


def test_a_byte_order_mark_is_fine(saved_model, tmp_path):
    folder = tmp_path / "bom"
    shutil.copytree(saved_model, folder)
    (folder / "config.json").write_bytes(b"\xef\xbb\xbf" + (saved_model / "config.json").read_bytes())
    assert list(load_pretrained(folder).unet.config.block_out_channels) == [32, 64, 64]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import DDPMScheduler

    from sara_edu.sd.tiny import tiny_sd_pipeline

    pipe, folder = tiny_sd_pipeline(seed=0), tmp_path_factory.mktemp("sd") / "sd"
    pipe.unet.save_pretrained(folder / "unet")
    pipe.vae.save_pretrained(folder / "vae")
    pipe.text_encoder.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    DDPMScheduler(**pipe.scheduler_config).save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize("file,key,value,msg", [
    ("unet/config.json", "norm_num_groups", 0, r"norm_num_groups=0 cannot build UNet2DConditionModel"),
    ("unet/config.json", "block_out_channels", "wide", r"block_out_channels='wide' is not valid"),
    ("vae/config.json", "latent_channels", "4", r"latent_channels='4' is not valid for AutoencoderKL"),
    ("text_encoder/config.json", "hidden_size", "big", r"hidden_size='big' is not valid for CLIPTextConfig"),
    ("text_encoder/config.json", "num_attention_heads", 5, r"num_attention_heads=5 cannot build CLIPTextConfig"),
    ("scheduler/scheduler_config.json", "beta_schedule", "nope", r"beta_schedule='nope' is not valid for DDPM"),
])
def test_bad_stable_diffusion_config_values_name_the_file_and_key(sd_folder, tmp_path, file, key, value, msg):
    from sara_edu.sd.load import load_stable_diffusion

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    config = json.loads((folder / file).read_text())
    assert key in config or file.startswith("text_encoder")
    config[key] = value
    (folder / file).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=msg) as e:
        load_stable_diffusion(folder, device="cpu", local_files_only=True)
    assert str(folder / file) in str(e.value)
