"""The course model: a tiny text-to-image diffusion model built from diffusers parts.

It has the same anatomy as Stable Diffusion, only smaller: a
``UNet2DConditionModel`` with cross-attention down/up blocks, a frozen text
encoder (:class:`~sara_edu.world.text.TinyTextEncoder`), a DDPM noise schedule for
training and a DDIM sampler for generation. It works in pixel space (16x16 RGB),
so there is no VAE. About 1.7M parameters: small enough to pretrain on a laptop
CPU, big enough that its weight statistics look like a real UNet's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import describe_mismatch, load_tensors, save_tensors
from ..training.finite import check_finite_weights, listed_non_finite, non_finite_tensors, pipe_parameters
from .config_file import check_config, read_config
from .paths import PRETRAINED_DIR, check_data_dir
from .text import EMBED_DIM, TinyTextEncoder

TINY_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": EMBED_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                    "prediction_type": "epsilon", "clip_sample": False}


def build_unet(config: dict | None = None, seed: int | None = 0) -> nn.Module:
    """A randomly initialised UNet2DConditionModel (the course's by default)."""
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DConditionModel(**(config or TINY_UNET_CONFIG))


def noise_scheduler(config: dict | None = None):
    """The DDPM schedule used to add noise during training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(config or SCHEDULER_CONFIG))


@dataclass
class TinyDiffusion:
    """UNet + text encoder + schedule: the course's answer to ``StableDiffusionPipeline``."""

    unet: nn.Module
    text_encoder: TinyTextEncoder = field(default_factory=TinyTextEncoder)
    scheduler_config: dict = field(default_factory=lambda: dict(SCHEDULER_CONFIG))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> "TinyDiffusion":
        self.unet.to(device)
        self.text_encoder.to(device)
        return self

    def encode(self, prompts) -> torch.Tensor:
        return self.text_encoder(prompts)


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source="checkpoint") -> None:
    """``load_state_dict`` that explains a mismatch instead of dumping a traceback, and refuses NaN or inf."""
    own = module.state_dict()
    problem = describe_mismatch({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in state.items()})
    if problem:
        raise CheckpointError(f"{source} does not match the model: {problem}. "
                              "Load it into a model built with the config saved beside it.")
    check_finite_weights(state.items(), f"{source} holds",
                         "The file is damaged (or was saved from a diverged run): re-create it (`make data` "
                         "regenerates the shipped files, save_pretrained a healthy model) or restore it from git.")
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def save_pretrained(pipe: TinyDiffusion, folder, metadata: dict | None = None) -> Path:
    """Write ``config.json``, ``unet.safetensors`` and ``text_encoder.safetensors``."""
    folder = Path(folder)
    check_finite_weights(pipe_parameters(pipe), f"save_pretrained refuses to write {folder}: the model holds",
                         "Such weights cannot be loaded back; save the model from before the run diverged "
                         "(or reload it with load_pretrained()).")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"unet": dict(pipe.unet.config), "scheduler": pipe.scheduler_config, **(metadata or {})}
    save_tensors(pipe.unet.state_dict(), folder / "unet.safetensors", {"unet_config": config["unet"]})
    save_tensors(pipe.text_encoder.state_dict(), folder / "text_encoder.safetensors")
    from ..io import atomic_write_bytes

    atomic_write_bytes(folder / "config.json",
                       lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)))
    return folder


def load_pretrained(folder=None, checkpoint: str | None = None, device=None) -> TinyDiffusion:
    """Load the shipped course model (or one saved with :func:`save_pretrained`).

    ``checkpoint`` picks an intermediate pretraining checkpoint by name
    (see :func:`list_checkpoints`) instead of the final weights.
    """
    if folder is None:
        check_data_dir()
    folder = Path(folder or PRETRAINED_DIR)
    cfg_path = folder / "config.json"
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file, expected the model's folder (config.json, unet.safetensors, "
                              f"text_encoder.safetensors): pass {folder.parent} if the file is in it.")
    if not cfg_path.exists():
        raise CheckpointError(f"no config.json in {folder}. Point at a folder written by save_pretrained, "
                              "or run `make data` to regenerate the shipped model.")
    config = read_config(cfg_path, "course model config")
    unet_config, scheduler_config = _checked_sections(config, cfg_path)
    unet = build_unet(unet_config, seed=None)
    weights = folder / "unet.safetensors" if checkpoint is None else folder / "checkpoints" / f"{checkpoint}.safetensors"
    if checkpoint is not None and not weights.exists():
        raise CheckpointError(f"no checkpoint {checkpoint!r} in {folder / 'checkpoints'}; "
                              f"available: {list_checkpoints(folder)}")
    state, _ = load_tensors(weights)
    load_state_dict_checked(unet, state, source=str(weights))
    text_encoder = TinyTextEncoder()
    te_state, _ = load_tensors(folder / "text_encoder.safetensors")
    load_state_dict_checked(text_encoder, te_state, source=str(folder / "text_encoder.safetensors"))
    pipe = TinyDiffusion(unet.eval(), text_encoder, scheduler_config)
    return pipe.to(device) if device is not None else pipe


def _checked_sections(config: dict, cfg_path: Path) -> tuple[dict, dict]:
    """The ``unet`` and ``scheduler`` settings of a course config, each checked against its class."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    sections = {}
    for key, default in (("unet", None), ("scheduler", SCHEDULER_CONFIG)):
        value = config.get(key, default)
        if not isinstance(value, dict):
            raise CheckpointError(f"{cfg_path}: key {key!r} must be a JSON object of settings, got "
                                  f"{'nothing' if value is None else type(value).__name__}. Re-create the folder "
                                  "with save_pretrained (or `make data` for the shipped model).")
        sections[key] = {k: v for k, v in value.items() if not k.startswith("_")}
    check_config(sections["unet"], UNet2DConditionModel, f"{cfg_path} ['unet']", allow_unknown=False)
    for cls in (DDPMScheduler, DDIMScheduler):  # training adds noise with one, generate samples with the other
        check_config(sections["scheduler"], cls, f"{cfg_path} ['scheduler']", allow_unknown=False)
    return sections["unet"], dict(sections["scheduler"])


def list_checkpoints(folder=None) -> list[str]:
    """Names of the intermediate pretraining checkpoints, in training order."""
    if folder is None:
        check_data_dir()
    folder = Path(folder or PRETRAINED_DIR) / "checkpoints"
    return sorted(p.stem for p in folder.glob("*.safetensors"))


@torch.no_grad()
def generate(pipe: TinyDiffusion, prompts, steps: int = 25, seed: int = 0, guidance_scale: float = 3.0,
             batch_size: int = 256) -> torch.Tensor:
    """Sample images for ``prompts`` with DDIM and classifier-free guidance.

    Returns (N, 3, H, W) in [-1, 1] on the CPU. Image ``i`` starts from noise
    seeded with ``seed + i``, so the same prompt and seed give the same image
    whatever else is in the batch: side-by-side comparisons stay fair.
    """
    from diffusers import DDIMScheduler

    from .sampling import check_sampling_args

    check_pipe(pipe, "generate")
    max_steps = int(pipe.scheduler_config.get("num_train_timesteps", SCHEDULER_CONFIG["num_train_timesteps"]))
    prompts, steps, seed, guidance_scale, batch_size = check_sampling_args(
        prompts, steps, seed, guidance_scale, batch_size, max_steps)
    unet, device = pipe.unet, pipe.device
    cfg = unet.config
    scheduler = DDIMScheduler(**pipe.scheduler_config)
    scheduler.set_timesteps(steps)
    dtype = next(unet.parameters()).dtype
    out = []
    was_training = unet.training
    unet.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            cond = pipe.encode(chunk).to(dtype)
            uncond = pipe.encode([""] * len(chunk)).to(dtype)
            x = torch.stack([torch.randn(cfg.in_channels, cfg.sample_size, cfg.sample_size,
                                         generator=torch.Generator().manual_seed(seed + start + i))
                             for i in range(len(chunk))]).to(device, dtype)
            for t in scheduler.timesteps:
                eps = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
                e_u, e_c = eps.chunk(2)
                x = scheduler.step(e_u + guidance_scale * (e_c - e_u), t, x).prev_sample
            out.append(x.float().clamp(-1, 1).cpu())
    finally:
        unet.train(was_training)
    images = torch.cat(out)
    if not torch.isfinite(images).all():
        raise FloatingPointError(f"generate produced NaN or infinite pixels. {non_finite_report(pipe)}")
    return images


def check_pipe(pipe, caller: str) -> None:
    """Refuse anything but a course pipeline (a bare UNet is the usual mix-up)."""
    if not (isinstance(pipe, TinyDiffusion) or all(hasattr(pipe, a) for a in ("unet", "encode", "scheduler_config"))):
        raise ConfigError(f"{caller} needs the whole model (a TinyDiffusion, e.g. load_pretrained()), got "
                          f"{type(pipe).__name__}. A bare UNet has no text encoder: wrap it as TinyDiffusion(unet).")


def non_finite_report(pipe, if_half: str = "sample in float32 (pipe.unet.float())") -> str:
    """Why sampling gave NaN or inf, in one sentence: the weights to blame, or what overflowed.

    ``pipe``: a pipeline (its UNet, text encoder and VAE are checked) or one module.
    ``if_half``: what to suggest when every weight is finite and some part runs in half precision.
    """
    named = pipe_parameters(pipe)
    bad = non_finite_tensors(named)
    if bad:
        return (f"The model's weights are not finite: {listed_non_finite(bad)}. A damaged model file or a diverged training "
                "run leaves such weights: reload the model (load_pretrained(), load_stable_diffusion(), or "
                "re-create / re-download its files); if your training run produced them, train again with a "
                "lower lr.")
    half = sorted({str(p.dtype).removeprefix("torch.") for _, p in named} & {"float16", "bfloat16"})
    if half:
        return (f"Every weight is finite, so the computation overflowed ({', '.join(half)} overflows easily): "
                f"{if_half}.")
    name, p = max(named, key=lambda item: float(item[1].detach().abs().max()) if item[1].numel() else 0.0)
    return (f"Every weight is finite and in float32, so the computation overflowed: the largest |w| is "
            f"{float(p.detach().abs().max()):.3g} (in {name}); if a training run blew the weights up, reload the "
            "model and train with a lower lr; else lower guidance_scale.")
