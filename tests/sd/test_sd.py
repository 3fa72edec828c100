"""Stable Diffusion path: the tiny SD-shaped pipeline, loading, training and sampling."""
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from sara_edu.errors import CheckpointError, ConfigError
from sara_edu.sd.load import StableDiffusionAdapter, load_stable_diffusion
from sara_edu.sd.sample import generate_sd
from sara_edu.sd.tiny import SD_SCHEDULER_CONFIG, tiny_sd3_transformer, tiny_sd_pipeline
from sara_edu.training.loop import train
from sara_edu.training.method import FullFineTuning
from sara_edu.world.data import (
    ImageFolderDataset,
    StyleDataset,
    TensorImageDataset,
    export_image_folder,
)


@pytest.fixture
def sd_pipe():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def style_folder(tmp_path_factory):
    """A tiny user folder in the paper's format (PNGs + metadata.jsonl), 64 px like the tiny VAE wants."""
    style = StyleDataset("cyberpunk", limit_per_digit=1)
    big = F.interpolate(style.images, size=64, mode="bilinear", align_corners=False).clamp(-1, 1)
    return export_image_folder(TensorImageDataset(big, style.prompts), tmp_path_factory.mktemp("cyberpunk"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of hanging."""
    def refuse(*args, **kwargs):
        raise AssertionError("the code tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


# ---------------------------------------------------------------- the tiny pipeline
def test_tiny_pipeline_builds_offline_with_sd_anatomy(no_network):
    pipe = tiny_sd_pipeline(seed=0)
    assert isinstance(pipe, StableDiffusionAdapter)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__.startswith("CLIPTokenizer")
    assert any("CrossAttn" in t for t in pipe.unet.config.down_block_types)
    assert pipe.vae_scale_factor == 8 and pipe.resolution == 64  # SD1.5: 8 and 512
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000
    # Frozen parts do not train; only the UNet is left for the method to decide.
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    # Same seed, same weights.
    again = tiny_sd_pipeline(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), again.unet.parameters()))


def test_tokenizer_is_clip_style():
    tok = tiny_sd_pipeline().tokenizer
    ids = tok("a digit 3, cyberpunk style").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "digit</w>", "3</w>", ",</w>", "cyberpunk</w>", "style</w>",
                      "<|endoftext|>"]
    # Words outside the course vocabulary still tokenize (letter by letter), never to <unk>.
    odd = tok.convert_ids_to_tokens(tok("zebra").input_ids)
    assert odd[1:-1] == ["z", "e", "b", "r", "a</w>"]
    assert tok.model_max_length == 77


def test_encode_shapes_and_determinism(sd_pipe):
    emb = sd_pipe.encode(["a digit 3", "a digit 3", "a digit 4, hornify style"])
    assert emb.shape == (3, 77, sd_pipe.unet.config.cross_attention_dim)
    assert not emb.requires_grad
    assert torch.equal(emb[0], emb[1])
    assert not torch.allclose(emb[0], emb[2])
    # Independent reference: CLIP's last hidden state of the padded token ids.
    ids = sd_pipe.tokenizer(["a digit 3"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(emb[:1], sd_pipe.text_encoder(ids).last_hidden_state)
    assert sd_pipe.encode("a digit 3").shape == (1, 77, emb.shape[-1])


def test_encode_images_is_scaled_vae_sample(sd_pipe):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.manual_seed(123)
    latents = sd_pipe.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 8)
    assert not latents.requires_grad
    torch.manual_seed(123)
    reference = sd_pipe.vae.encode(pixels).latent_dist.sample() * 0.18215
    torch.testing.assert_close(latents, reference)


# ---------------------------------------------------------------- training and sampling
def test_full_fine_tuning_through_the_shared_loop(sd_pipe, style_folder):
    data = ImageFolderDataset(style_folder, size=sd_pipe.resolution)
    assert len(data) == 7 and data[0]["pixel_values"].shape == (3, 64, 64)
    unet0, vae0, te0 = _snapshot(sd_pipe.unet), _snapshot(sd_pipe.vae), _snapshot(sd_pipe.text_encoder)
    history = train(sd_pipe, data, FullFineTuning(), steps=2, batch_size=2, lr=1e-3, progress=False,
                    mixed_precision="bf16")  # ignored on CPU, as on a laptop
    assert list(history.step) == [1, 2]
    assert history.loss.notna().all() and (history.loss > 0).all()
    assert _changed(unet0, sd_pipe.unet)
    assert not _changed(vae0, sd_pipe.vae) and not _changed(te0, sd_pipe.text_encoder)


def test_generate_shape_seeds_and_uses_the_fine_tuned_unet(sd_pipe):
    prompts = ["a digit 3, cyberpunk style", "a digit 5"]
    images = generate_sd(sd_pipe, prompts, steps=2, seed=7, guidance_scale=3.0)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # Image i starts from seed + i, whatever else is in the batch.
    alone = generate_sd(sd_pipe, prompts[1:], steps=2, seed=8, guidance_scale=3.0)
    torch.testing.assert_close(images[1:], alone)
    # Changing the UNet changes the samples: the pipeline shares the trained module.
    with torch.no_grad():
        sd_pipe.unet.conv_out.bias.add_(0.5)
    assert not torch.allclose(generate_sd(sd_pipe, prompts, steps=2, seed=7, guidance_scale=3.0), images)
    with pytest.raises(ConfigError):
        generate_sd(sd_pipe, prompts, steps=0)


# ---------------------------------------------------------------- loading
def _save_diffusers_folder(pipe, folder):
    from diffusers import DDPMScheduler

    pipe.unet.save_pretrained(folder / "unet")
    pipe.vae.save_pretrained(folder / "vae")
    pipe.text_encoder.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    DDPMScheduler(**pipe.scheduler_config).save_pretrained(folder / "scheduler")
    return folder


def test_load_local_folder_round_trip(sd_pipe, tmp_path, no_network):
    folder = _save_diffusers_folder(sd_pipe, tmp_path / "sd")
    loaded = load_stable_diffusion(folder, device="cpu", local_files_only=True)
    for a, b in zip(sd_pipe.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(loaded.encode(["a digit 3"]), sd_pipe.encode(["a digit 3"]))
    assert loaded.scheduler_config["beta_schedule"] == SD_SCHEDULER_CONFIG["beta_schedule"]
    assert loaded.vae.dtype == torch.float32 and loaded.mixed_precision is None  # CPU: no half precision
    # What a GPU gets: frozen parts in half precision, the UNet's master weights in float32.
    half = load_stable_diffusion(folder, device="cpu", dtype=torch.bfloat16, local_files_only=True)
    assert half.vae.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16
    assert half.unet.dtype == torch.float32


def test_load_errors_are_clear_and_never_wait(tmp_path, no_network, sd_pipe, monkeypatch):
    """Each failure is reported at once: no network (``no_network``) and no retry loop that sleeps before giving up.

    Checked by what the loader does, not by a stopwatch: a wall-time bound fails on a busy machine.
    """
    waits = []
    monkeypatch.setattr(time, "sleep", lambda seconds: waits.append(seconds))
    with pytest.raises(CheckpointError, match="hf download"):
        load_stable_diffusion(tmp_path / "nowhere", local_files_only=True)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(CheckpointError, match="vae/"):
        load_stable_diffusion(tmp_path / "half", local_files_only=True)
    with pytest.raises(CheckpointError, match="pass the local folder"):
        load_stable_diffusion("nobody-has/this-model-xyz", local_files_only=True)
    # Configs present but the weights missing (e.g. an interrupted download).
    folder = _save_diffusers_folder(sd_pipe, tmp_path / "noweights")
    next((folder / "unet").glob("*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="could not load"):
        load_stable_diffusion(folder, local_files_only=True)
    assert waits == [], f"the loader slept {waits} s before reporting the error (a retry loop?)"


def test_half_precision_frozen_parts_with_float32_unet(sd_pipe, style_folder):
    """The CUDA set-up (bf16 VAE + text encoder, fp32 UNet), checked on the CPU."""
    sd_pipe.vae.to(torch.bfloat16)
    sd_pipe.text_encoder.to(torch.bfloat16)
    assert sd_pipe.encode(["a digit 1"]).dtype == torch.float32
    assert sd_pipe.encode_images(torch.zeros(1, 3, 64, 64)).dtype == torch.float32
    history = train(sd_pipe, ImageFolderDataset(style_folder, size=64), FullFineTuning(), steps=1,
                    batch_size=2, progress=False)
    assert history.loss.notna().all()
    images = generate_sd(sd_pipe, ["a digit 1"], steps=2)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert sd_pipe.unet.dtype == torch.float32  # master weights stay float32


# ---------------------------------------------------------------- SaRA and LoRA on the SD anatomy
def _global_abs_quantile(module, q):
    values = torch.cat([p.detach().abs().flatten() for p in module.parameters()])
    return torch.quantile(values.double(), q).item()


def test_sara_trains_only_small_entries_and_saves_sparse(sd_pipe, style_folder, tmp_path):
    from sara_edu.sara.sparse_file import load_sparse
    from sara_edu.training.sara import SaRA

    data = ImageFolderDataset(style_folder, size=64)
    before = _snapshot(sd_pipe.unet)
    # Independent reference for the selection: the smallest 10% of |w| over the whole UNet.
    theta = _global_abs_quantile(sd_pipe.unet, 0.1)
    method = SaRA(fraction=0.1, progressive_iter="half")
    history = train(sd_pipe, data, method, steps=2, batch_size=2, lr=1e-2, progress=False)
    assert history.loss.notna().all()
    changed_total = 0
    for name, p in sd_pipe.unet.named_parameters():
        moved = p.detach() != before[name]
        changed_total += int(moved.sum())
        assert (before[name][moved].abs() <= theta * (1 + 1e-6)).all(), f"{name}: a large |w| entry trained"
    assert 0 < changed_total <= 0.1 * sum(p.numel() for p in sd_pipe.unet.parameters()) + 1
    assert method.trainable_parameters(sd_pipe.unet) > 0
    # Only the trained entries are saved, and they rebuild the fine-tuned UNet from a fresh base.
    path = method.save(tmp_path / "sara.safetensors")
    method.detach()
    fresh = tiny_sd_pipeline(seed=0)
    load_sparse(fresh.unet, path)
    for name, p in fresh.unet.named_parameters():
        assert torch.equal(p, sd_pipe.unet.get_parameter(name)), name
    assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in sd_pipe.unet.parameters())
    # After SaRA the UNet is a plain diffusers model: sampling just works.
    assert generate_sd(sd_pipe, ["a digit 2, cyberpunk style"], steps=2).shape == (1, 3, 64, 64)


def test_lora_trains_adapter_only_and_samples(sd_pipe, style_folder, tmp_path):
    from sara_edu.training.lora import LoRA, save_lora

    data = ImageFolderDataset(style_folder, size=64)
    base = _snapshot(sd_pipe.unet)
    images0 = generate_sd(sd_pipe, ["a digit 2"], steps=2)
    method = LoRA(rank=4)
    history = train(sd_pipe, data, method, steps=2, batch_size=2, lr=1e-2, progress=False)
    assert history.loss.notna().all()
    state = sd_pipe.unet.state_dict()
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and method.trainable_parameters(sd_pipe.unet) > 0
    # The base weights are untouched (PEFT renames wrapped ones to '<name>.base_layer.weight').
    for key, value in base.items():
        wrapped = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(wrapped)), value), key
    # The pipeline samples through the adapter (B moved away from zero, so the images change).
    images1 = generate_sd(sd_pipe, ["a digit 2"], steps=2)
    assert not torch.allclose(images0, images1)
    assert save_lora(sd_pipe.unet, tmp_path / "lora.safetensors").stat().st_size > 0


# ---------------------------------------------------------------- an SD3-style transformer
def test_sara_attaches_to_sd3_transformer_and_trains_one_step():
    from sara_edu.sara.optimizer import SaRAAdamW

    model = tiny_sd3_transformer(seed=0)
    before = _snapshot(model)
    theta = _global_abs_quantile(model, 0.1)
    optimizer = SaRAAdamW(model, lr=1e-2, fraction=0.1, rank_lambda=5e-4)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, model.config.pooled_projection_dim, generator=g)
    out = model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.tensor([10, 500])).sample
    assert out.shape == latents.shape
    torch.nn.functional.mse_loss(out, torch.randn(out.shape, generator=g)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    changed = 0
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        changed += int(moved.sum())
        selected = torch.zeros(p.numel(), dtype=torch.bool)
        selected[optimizer.selection.indices[name].long()] = True
        assert not (moved.flatten() & ~selected).any(), f"{name}: an unselected entry changed"
        assert (before[name][moved].abs() <= theta * (1 + 1e-6)).all()
    assert changed > 0.5 * optimizer.selection.total_selected  # almost every selected entry moved


def test_with_unet_shares_the_frozen_parts(sd_pipe):
    import copy

    other = sd_pipe.with_unet(copy.deepcopy(sd_pipe.unet))
    assert other.vae is sd_pipe.vae and other.text_encoder is sd_pipe.text_encoder
    assert other.unet is not sd_pipe.unet
    with torch.no_grad():
        other.unet.conv_out.bias.add_(1.0)
    assert not torch.equal(other.unet.conv_out.bias, sd_pipe.unet.conv_out.bias)


def test_incomplete_weights_are_refused_not_silently_random(sd_pipe, tmp_path, no_network):
    from safetensors.torch import load_file, save_file

    folder = _save_diffusers_folder(sd_pipe, tmp_path / "sd")
    weights = next((folder / "text_encoder").glob("*.safetensors"))
    state = load_file(weights)
    dropped = sorted(k for k in state if "layers.0" in k)[0]
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="text_encoder weights are incomplete"):
        load_stable_diffusion(folder, local_files_only=True)


def test_download_fetches_only_what_loading_reads():
    """The SD1.5 repo holds ~20 GB (pickles, EMA, fp16 copies, safety checker); we need about 4 GB."""
    from huggingface_hub.utils import filter_repo_objects

    from sara_edu.sd.load import _weight_patterns

    repo = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
            "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
            "safety_checker/model.safetensors", "scheduler/scheduler_config.json",
            "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
            "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
            "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"]
    got = set(filter_repo_objects(repo, allow_patterns=_weight_patterns(None)))
    weights = {f for f in got if not f.endswith((".json", ".txt"))}
    assert weights == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                       "text_encoder/model.safetensors"}
    assert {"unet/config.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
            "tokenizer/merges.txt"} <= got
    half = {f for f in filter_repo_objects(repo, allow_patterns=_weight_patterns("fp16")) if "fp16" in f}
    assert half == {"unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"}


def test_a_damaged_weights_file_is_refused_naming_the_part_and_the_count(sd_pipe, tmp_path, no_network):
    folder = _save_diffusers_folder(sd_pipe, tmp_path / "sd")
    weights = next((folder / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1000:] = b"\xff" * 1000  # a bad copy: 250 float32 NaN, the header still valid
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"the unet weights in \S+unet hold 250 NaN or infinite values in "
                                              r"1 tensor: \S+ \(250 of [\d,]+\)\. The file is damaged.*download "
                                              r"it again"):
        load_stable_diffusion(folder, local_files_only=True)


def _run_isolated(code: str):
    """Run ``code`` in a fresh interpreter: a crash of torch (a segfault) must not take the test run with it."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=900)  # a ceiling against a hang only


_TINY_SD_RUN = """
import torch, torch.nn.functional as F
from sara_edu.errors import ConfigError
from sara_edu.sd.tiny import tiny_sd_pipeline
from sara_edu.training import SaRA
from sara_edu.training.loop import train
from sara_edu.training.method import TrainingMethod
from sara_edu.world.data import StyleDataset, TensorImageDataset

style = StyleDataset("cyberpunk", limit_per_digit=1)
data = TensorImageDataset(F.interpolate(style.images, size=64, mode="bilinear").clamp(-1, 1), style.prompts)
pipe = tiny_sd_pipeline(seed=0)
"""


def test_threshold_selecting_only_zero_norm_biases_is_a_clear_error_not_a_segfault():
    done = _run_isolated(_TINY_SD_RUN + """
try:
    train(pipe, data, SaRA(threshold=1e-30, fraction=None), steps=2, batch_size=2, progress=False)
except ConfigError as e:
    print("ConfigError:", e)
""")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "ConfigError: threshold=1e-30 selects nothing useful to train: its 1,664 entries" in done.stdout
    assert "exactly 0" in done.stdout and "smallest non-zero |w| is" in done.stdout and "threshold=0.0" in done.stdout


def test_training_only_norm_layers_on_vae_latents_does_not_crash():
    """torch's CPU GroupNorm backward segfaults on a channels-last input (what the VAE returns) that needs no
    gradient while the norm's own weights train: the latents are made contiguous."""
    done = _run_isolated(_TINY_SD_RUN + """
class OnlyNorms(TrainingMethod):
    name = "norms"

    def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
        unet.requires_grad_(False)
        norms = [p for m in unet.modules() if isinstance(m, torch.nn.GroupNorm) for p in m.parameters()]
        for p in norms:
            p.requires_grad_(True)
        return torch.optim.AdamW(norms, lr=lr)

with torch.no_grad():  # the crash's cause: the CPU VAE returns a batch of latents channels-last
    assert not pipe.vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.sample().is_contiguous()
history = train(pipe, data, OnlyNorms(), steps=1, batch_size=2, progress=False)
print("loss", history.loss.iloc[0])
""")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "loss" in done.stdout


def test_a_file_given_as_the_stable_diffusion_folder_is_told_it_is_a_file(sd_pipe, tmp_path, no_network):
    folder = _save_diffusers_folder(sd_pipe, tmp_path / "sd")
    weights = next((folder / "unet").glob("*.safetensors"))
    with pytest.raises(CheckpointError, match=r"is a file, expected a folder with unet/, vae/.*pass that folder, not "
                                              r"a file in it"):
        load_stable_diffusion(weights, local_files_only=True)
