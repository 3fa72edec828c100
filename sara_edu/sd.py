"""Stable Diffusion through the course's training loop.

:func:`sara_edu.train.train` only needs a ``pipe`` with ``unet``,
``encode(prompts)``, ``encode_images(pixels)``, ``scheduler_config`` and
``to(device)``. :class:`StableDiffusionAdapter` gives exactly that on top of
the real diffusers/transformers components of Stable Diffusion 1.5 (CLIP
tokenizer + text encoder, VAE, UNet), so SaRA, LoRA and full fine-tuning run
on SD with the very same code the course uses on its tiny model::

    pipe = load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
    data = ImageFolderDataset("my_style/", size=pipe.resolution)
    history = train(pipe, data, SaRA(threshold=2e-3), steps=1000, batch_size=4,
                    lr=1e-4, mixed_precision=pipe.mixed_precision)
    images = generate_sd(pipe, ["a castle, my style"], seed=0)

Only the UNet trains. The frozen VAE and text encoder run in half precision on
CUDA (they need no optimizer state, so that halves their memory for free),
while the UNet keeps float32 master weights and the loop's autocast does the
mixed precision. :func:`tiny_sd_pipeline` builds the same anatomy, randomly
initialised and a few hundred kilobytes big, fully offline: tests use it, and
the notebooks fall back to it when there is no GPU or no weights.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The sub-folders of a diffusers Stable Diffusion repository that training and
# sampling need. The safety checker (1.2 GB) and feature extractor are skipped.
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusionAdapter:
    """Stable Diffusion's parts, shaped for :func:`sara_edu.train.train`.

    ``unet`` is the only trainable part. ``scheduler_config`` is a
    :class:`~diffusers.DDPMScheduler` config (the training noise schedule);
    :func:`generate_sd` turns it into a DDIM sampler.
    """

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict = field(default_factory=dict)
    source: str = "tiny"

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent covers per side (8 for SD1.5)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was built for (512 for SD1.5)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def mixed_precision(self) -> str | None:
        """What to pass to ``train(..., mixed_precision=)``: bf16/fp16 on CUDA, None on CPU."""
        dtype = self.vae.dtype
        if self.device.type != "cuda" or dtype == torch.float32:
            return None
        return "bf16" if dtype == torch.bfloat16 else "fp16"

    def to(self, device) -> "StableDiffusionAdapter":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        """CLIP ``encoder_hidden_states`` (B, 77, dim) for ``prompts``, frozen.

        Returned in the UNet's dtype so the loop works with or without autocast.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        hidden = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]
        return hidden.to(self.unet.dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents of images in [-1, 1], scaled like SD training (``* scaling_factor``)."""
        cfg = self.vae.config
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample()
        if getattr(cfg, "shift_factor", None) is not None:  # SD3-style VAEs also shift
            latents = latents - cfg.shift_factor
        return (latents * cfg.scaling_factor).to(self.unet.dtype)

    def with_unet(self, unet: nn.Module) -> "StableDiffusionAdapter":
        """The same frozen VAE, text encoder and tokenizer around another UNet.

        Compare methods from one base without reloading anything:
        ``pipe.with_unet(copy.deepcopy(base_unet))`` per method.
        """
        return replace(self, unet=unet)

    def pipeline(self):
        """A diffusers ``StableDiffusionPipeline`` sharing these very modules.

        Nothing is copied: after fine-tuning, the pipeline samples with the
        fine-tuned UNet (LoRA adapters and SaRA's sparse updates included).
        """
        with _quiet_transformers():
            from diffusers import DDIMScheduler, StableDiffusionPipeline

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        return pipe


# The short name used in the notebooks.
SDPipe = StableDiffusionAdapter


def default_dtype(device=None) -> torch.dtype:
    """Precision for the frozen parts: bf16 on CUDA that has it, else fp16 on CUDA, fp32 on CPU."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_stable_diffusion(model_id_or_path: str = SD15_ID, device=None, dtype: torch.dtype | None = None,
                          local_files_only: bool | None = None, variant: str | None = None,
                          unet_dtype: torch.dtype = torch.float32) -> StableDiffusionAdapter:
    """Load Stable Diffusion (1.x/2.x layout) from the Hub or a local diffusers folder.

    ``model_id_or_path`` is a Hub id such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``
    or a folder with ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` (e.g. the output of
    ``python -m sara_edu.sd download``). Only ``.safetensors`` weights are read. ``dtype`` is the
    precision of the frozen VAE and text encoder (default: :func:`default_dtype`); the UNet
    is loaded in ``unet_dtype`` (float32 master weights for training). ``local_files_only``
    never touches the network (``None``: follow ``HF_HUB_OFFLINE``). ``variant="fp16"``
    downloads the half-size weight files.

    Raises :class:`~sara_edu.errors.CheckpointError` saying what to do when the folder or
    the weights are missing, or the Hub cannot be reached.
    """
    from .train import pick_device

    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    folder = _resolve_folder(str(model_id_or_path), local_files_only, variant)
    try:
        with _quiet_transformers():
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer

            common = {"use_safetensors": True, "variant": variant, "local_files_only": True,
                      "output_loading_info": True}
            unet = _complete("unet", *UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=unet_dtype,
                                                                           **common))
            vae = _complete("vae", *AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, **common))
            text_encoder = _complete("text_encoder", *CLIPTextModel.from_pretrained(
                folder / "text_encoder", torch_dtype=dtype, **common))
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
            scheduler_config = DDPMScheduler.from_pretrained(folder / "scheduler").config
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"could not load Stable Diffusion from {folder} ({type(e).__name__}: {str(e)[:300]}). "
            f"{_DOWNLOAD_HINT.format(id=model_id_or_path)}") from e
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    pipe = StableDiffusionAdapter(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer,
                                  _ddpm_config(scheduler_config), source=str(model_id_or_path))
    return pipe.to(device)


def _complete(part: str, model: nn.Module, info: dict) -> nn.Module:
    """Refuse a component whose file lacks weights: they would be silently random (warnings are muted)."""
    missing = list(info.get("missing_keys") or []) + [k for k, *_ in info.get("mismatched_keys") or []]
    if missing:
        raise OSError(f"{part} weights are incomplete: {len(missing)} missing or mismatched (e.g. {missing[0]})")
    return model


_DOWNLOAD_HINT = ("Download it on a machine with network: `python -m sara_edu.sd download {id} --to sd15` "
                  "(or `hf download {id} --local-dir sd15 --include '*.json' --include '*.txt' "
                  "--include '*/diffusion_pytorch_model.safetensors' --include 'text_encoder/model.safetensors'`; "
                  "with an older huggingface_hub, `huggingface-cli download` takes the same arguments), "
                  "copy the folder here and pass the local folder: load_stable_diffusion('sd15').")


def _weight_patterns(variant: str | None) -> list[str]:
    """The files training and sampling need: configs, tokenizer, three safetensors weights."""
    suffix = f".{variant}" if variant else ""
    return ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*",
            f"unet/diffusion_pytorch_model{suffix}.safetensors",
            f"vae/diffusion_pytorch_model{suffix}.safetensors",
            f"text_encoder/model{suffix}.safetensors"]


def download_stable_diffusion(model_id: str = SD15_ID, local_dir=None, variant: str | None = None) -> Path:
    """Download only what :func:`load_stable_diffusion` reads (about 4 GB for SD1.5, 2 GB with ``variant="fp16"``).

    No safety checker, no ``.bin`` pickles, no EMA copies. ``local_dir``: a folder to put
    the files in (to copy to an offline machine); default: the Hugging Face cache.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=_weight_patterns(variant),
                                      local_dir=None if local_dir is None else str(local_dir)))
    except Exception as e:  # offline, unknown id, gated repo: say so plainly
        raise CheckpointError(f"could not download {model_id!r} ({type(e).__name__}: {str(e)[:200]}). "
                              "Check the id and your network; gated models need `hf auth login`.") from e


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a folder."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).exists()
            or ":" in name)


def _resolve_folder(name: str, local_files_only: bool | None, variant: str | None) -> Path:
    """A local folder holding the components: the folder itself, or the Hub snapshot of an id."""
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"Stable Diffusion folder {folder} does not exist. "
                                  + _DOWNLOAD_HINT.format(id=SD15_ID))
        missing = [c for c in _COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise CheckpointError(
                f"{folder} is not a diffusers Stable Diffusion folder: it lacks {', '.join(m + '/' for m in missing)}. "
                "Expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/ sub-folders. "
                + _DOWNLOAD_HINT.format(id=SD15_ID))
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=_weight_patterns(variant),
                                      local_files_only=bool(local_files_only)))
    except Exception as e:  # offline, unknown id, gated repo, bad id syntax: all mean "get the files"
        raise CheckpointError(f"could not get {name!r} from the Hugging Face Hub or its cache "
                              f"({type(e).__name__}: {str(e)[:200]}). {_DOWNLOAD_HINT.format(id=name)}") from e


def _ddpm_config(config) -> dict:
    """Keep only what ``DDPMScheduler(**config)`` accepts (SD ships a PNDM config)."""
    from diffusers import DDPMScheduler

    return {k: v for k, v in dict(DDPMScheduler.from_config(dict(config)).config).items() if not k.startswith("_")}


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' import-time warnings (e.g. 'torchvision not installed')."""
    from transformers.utils import logging

    old = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(old)


@torch.no_grad()
def generate_sd(pipe: StableDiffusionAdapter, prompts, steps: int = 25, seed: int = 0,
                guidance_scale: float = 7.5, negative_prompt: str | None = None, batch_size: int = 8,
                progress: bool = False) -> torch.Tensor:
    """Sample with diffusers' ``StableDiffusionPipeline`` built on ``pipe``'s (fine-tuned) modules.

    Returns (N, 3, H, W) in [-1, 1] on the CPU, like :func:`sara_edu.model.generate`.
    Image ``i`` starts from noise seeded with ``seed + i`` (on the CPU, so it is the
    same on any device): the same prompt and seed give the same start before and
    after fine-tuning, which keeps side-by-side comparisons fair.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be >= 0, got {guidance_scale}")
    sd = pipe.pipeline()
    sd.set_progress_bar_config(disable=not progress)
    device = pipe.device
    # Frozen parts in half precision + float32 UNet (the training set-up): autocast
    # reconciles the dtypes, as it does in the training loop.
    half = next((m.dtype for m in (pipe.vae, pipe.text_encoder) if m.dtype != pipe.unet.dtype), None)
    was_training = pipe.unet.training
    pipe.unet.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
            with torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
                images = sd(chunk, num_inference_steps=steps, guidance_scale=guidance_scale,
                            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                            generator=generators, output_type="pt").images
            out.append(images.float().cpu() * 2 - 1)
    finally:
        pipe.unet.train(was_training)
    return torch.cat(out).clamp(-1, 1)


# ---------------------------------------------------------------- tiny, offline
TINY_SD_UNET_CONFIG = {
    "sample_size": 8,  # latents; x8 VAE -> 64 px images
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
TINY_SD_VAE_CONFIG = {  # four blocks = three 2x downsamplings = SD's 8x, 4 latent channels
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
TINY_CLIP_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 32}
# SD1.5's training schedule (scaled linear betas, epsilon prediction).
SD_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1,
                       "prediction_type": "epsilon"}


def tiny_clip_tokenizer(words=None):
    """A real ``CLIPTokenizer`` with a tiny vocabulary, built offline from files we write.

    CLIP's byte-level BPE starts from 512 symbols (each byte, alone or word-final
    ``</w>``); merges then build longer tokens. We add merges for the course's
    words (digits, styles, ...) so they become single tokens, and any other text
    still tokenizes, letter by letter.
    """
    from transformers import CLIPTokenizer

    from .text import VOCAB

    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in sorted(set(words or [w for w in VOCAB if w.isalpha()])):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]  # CLIP marks the last symbol of a word
        while len(pieces) > 1:  # merge left to right: d i -> di, di g -> dig, ...
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        with _quiet_transformers():  # "ftfy not installed" is expected and harmless here
            return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, local_files_only=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def tiny_sd_pipeline(seed: int = 0, device=None) -> StableDiffusionAdapter:
    """A randomly initialised, Stable-Diffusion-shaped pipeline built fully offline.

    The same classes as SD1.5 (``UNet2DConditionModel`` with cross-attention blocks,
    ``AutoencoderKL`` with 8x downsampling and 4 latent channels, ``CLIPTextModel``,
    ``CLIPTokenizer``) at toy sizes: 64 px images, 8x8 latents, well under a million
    parameters. It draws noise, not pictures, but every code path is the real one.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SD_UNET_CONFIG)
    vae = AutoencoderKL(**TINY_SD_VAE_CONFIG)
    clip_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **TINY_CLIP_CONFIG)
    text_encoder = CLIPTextModel(clip_config)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    pipe = StableDiffusionAdapter(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer,
                                  dict(SD_SCHEDULER_CONFIG), source="tiny (random weights)")
    return pipe.to(device) if device is not None else pipe


TINY_SD3_CONFIG = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                   "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                   "caption_projection_dim": 16, "pooled_projection_dim": 32, "pos_embed_max_size": 16}


def tiny_sd3_transformer(seed: int = 0) -> nn.Module:
    """A tiny randomly initialised ``SD3Transformer2DModel`` (MMDiT), the SD3-style backbone.

    SaRA only looks at parameters, so it attaches to a transformer as easily as to
    a UNet; the tests and notebook 05 use this to show it.
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY_SD3_CONFIG)


def main(argv=None) -> None:
    """``python -m sara_edu.sd download [MODEL_ID] --to FOLDER [--variant fp16]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sara_edu.sd", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download the files load_stable_diffusion needs")
    dl.add_argument("model_id", nargs="?", default=SD15_ID)
    dl.add_argument("--to", dest="local_dir", default=None, help="folder to download into (default: HF cache)")
    dl.add_argument("--variant", default=None, help="e.g. fp16 for half-size weights")
    args = parser.parse_args(argv)
    try:
        folder = download_stable_diffusion(args.model_id, args.local_dir, args.variant)
    except CheckpointError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"downloaded {args.model_id} to {folder}; load it with load_stable_diffusion({str(folder)!r})")


__all__ = ["SD15_ID", "load_or_stand_in", "download_stable_diffusion", "StableDiffusionAdapter", "SDPipe", "load_stable_diffusion", "generate_sd",
           "default_dtype", "tiny_sd_pipeline", "tiny_clip_tokenizer", "tiny_sd3_transformer",
           "TINY_SD_UNET_CONFIG", "TINY_SD_VAE_CONFIG", "TINY_CLIP_CONFIG", "SD_SCHEDULER_CONFIG",
           "TINY_SD3_CONFIG"]


if __name__ == "__main__":
    main()


def load_or_stand_in(model_id_or_path=SD15_ID, device=None) -> tuple["StableDiffusionAdapter", bool, str]:
    """Stable Diffusion on a GPU, else the tiny SD-shaped stand-in: ``(pipe, is_real, why)``.

    Fine-tuning SD1.5 on a CPU would take days, so without CUDA (or when the
    weights cannot be loaded) the notebook runs the very same code on
    :func:`tiny_sd_pipeline`. ``why`` says plainly which one you got and why.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        why = ("No CUDA GPU here: fine-tuning Stable Diffusion 1.5 (860M-parameter UNet) on a CPU would take days. "
               "Running the same code on tiny_sd_pipeline(), a randomly initialised SD-shaped model (64 px): "
               "its samples are noise; the point is that every cell runs. Open this notebook on a GPU for real results.")
        return tiny_sd_pipeline(seed=0, device=device), False, why
    try:
        return load_stable_diffusion(model_id_or_path, device=device), True, f"Loaded {model_id_or_path} on {device}."
    except CheckpointError as e:
        why = (f"Could not load {model_id_or_path}: {e}\nRunning the same code on tiny_sd_pipeline() instead "
               "(a randomly initialised, SD-shaped model).")
        return tiny_sd_pipeline(seed=0, device=device), False, why
