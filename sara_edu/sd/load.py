"""Stable Diffusion through the course's training loop: the adapter and loading.

:func:`sara_edu.training.train` only needs a ``pipe`` with ``unet``,
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
mixed precision.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


# The sub-folders of a diffusers Stable Diffusion repository that training and
# sampling need. The safety checker (1.2 GB) and feature extractor are skipped.
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusionAdapter:
    """Stable Diffusion's parts, shaped for :func:`sara_edu.training.train`.

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
        from ..world.sampling import check_prompts

        tokens = self.tokenizer(check_prompts(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        hidden = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]
        return hidden.to(self.unet.dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """VAE latents of images in [-1, 1], scaled like SD training (``* scaling_factor``).

        The latents are a sample of the VAE's posterior: ``generator`` (one ``torch.Generator``,
        or a list with one per image, as in diffusers) draws it; None uses torch's global RNG.
        :func:`~sara_edu.training.train` gives one generator per image of the global batch,
        seeded from its position there, so a process draws the same numbers for an image
        however the batch is split over processes.
        """
        cfg = self.vae.config
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise DataError(f"pixels must be a tensor of shape (N, 3, H, W) in [-1, 1], got {got}"
                            + (" (add a batch dimension with pixels[None])" if getattr(pixels, "ndim", 0) == 3 else ""))
        if isinstance(generator, (list, tuple)) and len(generator) != pixels.shape[0]:
            raise ConfigError(f"generator is a list of {len(generator)} generators for {pixels.shape[0]} images: "
                              "give one per image, or a single generator")
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator=list(generator) if isinstance(
            generator, tuple) else generator)
        if getattr(cfg, "shift_factor", None) is not None:  # SD3-style VAEs also shift
            latents = latents - cfg.shift_factor
        # contiguous: the VAE hands back channels-last latents on the CPU, and torch's CPU GroupNorm backward
        # crashes (segfault) on a channels-last input that needs no gradient when the norm's own weights train
        return (latents * cfg.scaling_factor).to(self.unet.dtype).contiguous()

    def with_unet(self, unet: nn.Module) -> "StableDiffusionAdapter":
        """The same frozen VAE, text encoder and tokenizer around another UNet.

        Compare methods from one base without reloading anything:
        ``pipe.with_unet(copy.deepcopy(base_unet))`` per method.
        """
        if not isinstance(unet, nn.Module):
            raise ConfigError(f"with_unet needs a UNet module (e.g. copy.deepcopy(pipe.unet)), got {type(unet).__name__}")
        return replace(self, unet=unet)

    def pipeline(self):
        """A diffusers ``StableDiffusionPipeline`` sharing these very modules.

        Nothing is copied: after fine-tuning, the pipeline samples with the
        fine-tuned UNet (LoRA adapters and SaRA's sparse updates included).
        """
        with quiet_transformers():
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
    the weights are missing or hold NaN or inf (a damaged file), or the Hub cannot be reached.
    """
    from ..training.loop import pick_device

    for name, value in (("dtype", dtype), ("unet_dtype", unet_dtype)):
        if value is not None and not isinstance(value, torch.dtype):
            raise ConfigError(f"{name} must be a torch dtype such as torch.float16, got {type(value).__name__} "
                              f"{value!r}")
    if not isinstance(model_id_or_path, (str, Path)):
        raise ConfigError(f"model_id_or_path must be a Hub id such as {SD15_ID!r} or a folder, got "
                              f"{type(model_id_or_path).__name__} {model_id_or_path!r}")
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    folder = _resolve_folder(str(model_id_or_path), local_files_only, variant)
    check_component_configs(folder)
    try:
        with quiet_transformers():
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
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError,
            RuntimeError) as e:  # what diffusers/transformers raise for files and values they cannot use
        raise CheckpointError(
            f"could not load Stable Diffusion from {folder} ({type(e).__name__}: {str(e)[:300]}). "
            f"{_DOWNLOAD_HINT.format(id=model_id_or_path)}") from e
    from ..training.finite import check_finite_weights

    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        check_finite_weights(module.named_parameters(), f"the {part} weights in {folder / part} hold",
                             "The file is damaged (a bad download or copy): download it again. "
                             + _DOWNLOAD_HINT.format(id=model_id_or_path))
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    pipe = StableDiffusionAdapter(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer,
                                  _ddpm_config(scheduler_config), source=str(model_id_or_path))
    return pipe.to(device)


def check_component_configs(folder: Path) -> None:
    """Check each component's config file value by value, so a bad one names its file and key.

    Missing files are left to the loaders, whose error already says to download them.
    """
    with quiet_transformers():
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

    from ..world.config_file import check_config, read_config

    parts = (("unet/config.json", UNet2DConditionModel, None),
             ("vae/config.json", AutoencoderKL, None),
             ("text_encoder/config.json", CLIPTextConfig, lambda s: CLIPTextModel(CLIPTextConfig(**s))),
             ("scheduler/scheduler_config.json", DDPMScheduler, None))
    for name, cls, build in parts:
        path = folder / name
        if path.exists():
            with quiet_transformers():
                check_config(read_config(path, f"{cls.__name__} config"), cls, path, build=build)


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
        if folder.is_file():
            raise CheckpointError(f"Stable Diffusion folder {folder} is a file, expected a folder with unet/, vae/, "
                                  "text_encoder/, tokenizer/ and scheduler/ (a diffusers model folder such as "
                                  "`python -m sara_edu.sd download` writes); pass that folder, not a file in it.")
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
def quiet_transformers():
    """Silence transformers' import-time warnings (e.g. 'torchvision not installed')."""
    from transformers.utils import logging

    old = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(old)
