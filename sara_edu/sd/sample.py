"""Sampling from Stable Diffusion with a DDIM scheduler and classifier-free guidance."""
from __future__ import annotations

import torch

from ..errors import ConfigError, PromptError
from ..world.model import non_finite_report
from ..world.sampling import check_sampling_args
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
    if not isinstance(pipe, StableDiffusionAdapter):
        raise ConfigError(f"generate_sd needs a StableDiffusionAdapter (load_stable_diffusion(...) or "
                          f"tiny_sd_pipeline()), got {type(pipe).__name__}; the course model samples with "
                          "sara_edu.world.model.generate")
    max_steps = int(pipe.scheduler_config.get("num_train_timesteps", 1000))
    prompts, steps, seed, guidance_scale, batch_size = check_sampling_args(
        prompts, steps, seed, guidance_scale, batch_size, max_steps)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise PromptError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__} "
                          f"{negative_prompt!r}")
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
    images = torch.cat(out)
    if not torch.isfinite(images).all():
        raise FloatingPointError("generate_sd produced NaN or infinite pixels. " + non_finite_report(
            pipe, "load the VAE in float32 (load_stable_diffusion(..., dtype=torch.float32)) or bfloat16"))
    return images.clamp(-1, 1)
