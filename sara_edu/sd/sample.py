"""Sampling from Stable Diffusion with a DDIM scheduler and classifier-free guidance."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .load import StableDiffusionAdapter


@torch.no_grad()
def generate_sd(pipe: StableDiffusionAdapter, prompts, steps: int = 25, seed: int = 0,
                guidance_scale: float = 7.5, negative_prompt: str | None = None, batch_size: int = 8,
                progress: bool = False) -> torch.Tensor:
    """Sample with diffusers' ``StableDiffusionPipeline`` built on ``pipe``'s (fine-tuned) modules.

    Returns (N, 3, H, W) in [-1, 1] on the CPU, like :func:`sara_edu.world.model.generate`.
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
