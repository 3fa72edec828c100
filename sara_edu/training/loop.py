"""One training loop for every method: the diffusers text-to-image loop, small.

``train(pipe, dataset, method=...)`` fine-tunes ``pipe.unet`` with the
denoising loss (predict the noise added at a random timestep). What differs
between full fine-tuning, LoRA, selective fine-tuning and SaRA is only *which
parameters train and how*: that is a :class:`~sara_edu.training.method.TrainingMethod`,
whose ``build_optimizer`` freezes/injects what it needs and returns the optimizer.
Everything else (AdamW hyperparameters, cosine schedule with warm-up, gradient
clipping, mixed precision, progress bar, history) is shared.
"""
from __future__ import annotations

import math
import time

import pandas as pd
import torch

from ..errors import ConfigError, DataError
from .method import FullFineTuning, TrainingMethod


def pick_device(device=None) -> torch.device:
    """CUDA if present (or the device asked for), else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(dataset, batch_size, generator):
    """Endless shuffled batches of ``{"pixel_values", "prompt"}``, epoch after epoch."""
    n = len(dataset)
    while True:
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            items = [dataset[int(i)] for i in idx]
            yield torch.stack([it["pixel_values"] for it in items]), [it["prompt"] for it in items]


def _check(steps, lr, batch_size, warmup_steps, max_grad_norm, cond_dropout, mixed_precision, weight_decay):
    problems = []
    if not isinstance(steps, int) or steps < 1:
        problems.append(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        problems.append(f"learning rate must be a positive number, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive integer, got {batch_size!r}")
    if warmup_steps < 0 or (isinstance(steps, int) and warmup_steps >= max(steps, 1) and steps > 1):
        problems.append(f"warmup_steps must be in [0, steps), got {warmup_steps}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        problems.append(f"max_grad_norm must be positive or None, got {max_grad_norm}")
    if not 0 <= cond_dropout < 1:
        problems.append(f"cond_dropout must be in [0, 1), got {cond_dropout}")
    if weight_decay < 0:
        problems.append(f"weight_decay must be >= 0, got {weight_decay}")
    if mixed_precision not in (None, "no", "bf16", "fp16"):
        problems.append(f"mixed_precision must be None, 'bf16' or 'fp16', got {mixed_precision!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def train(pipe, dataset, method: TrainingMethod | None = None, *, steps: int = 200, lr: float = 1e-4,
          batch_size: int = 32, weight_decay: float = 1e-2, warmup_steps: int = 0,
          max_grad_norm: float | None = 1.0, seed: int = 0, device=None, mixed_precision: str | None = None,
          cond_dropout: float = 0.0, progress: bool = True, desc: str | None = None,
          callback=None, memory_tracker=None, stop_after: int | None = None) -> pd.DataFrame:
    """Fine-tune ``pipe.unet`` on ``dataset`` with ``method``; return the history.

    ``pipe`` is a :class:`~sara_edu.world.model.TinyDiffusion` (or anything with ``unet``,
    ``encode(prompts)``, ``scheduler_config``, ``to(device)`` and optionally
    ``encode_images(pixels) -> latents`` for latent diffusion). The history has one row per
    step: ``step, loss, lr, step_time_s, peak_memory_mb``. On CUDA the peak is the
    allocator's; on CPU it comes from ``memory_tracker`` when one is given (see
    :mod:`sara_edu.measure.memory`), else it is NaN.

    ``stop_after`` runs only the first steps of a ``steps``-long schedule (the
    learning-rate schedule is still the one for ``steps``), e.g. to check that a
    recipe reproduces its logged losses.

    ``callback(step, pipe, optimizer)`` runs after every optimizer step, e.g. to
    save intermediate checkpoints. ``cond_dropout`` replaces that fraction of
    prompts by the empty prompt, which classifier-free guidance needs.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    from diffusers import DDPMScheduler

    method = method or FullFineTuning()
    _check(steps, lr, batch_size, warmup_steps, max_grad_norm, cond_dropout, mixed_precision, weight_decay)
    if len(dataset) == 0:
        raise DataError("the dataset is empty: nothing to train on")
    device = pick_device(device)
    if mixed_precision in ("bf16", "fp16") and device.type != "cuda":
        mixed_precision = None  # autocast on CPU is slow and not what the course measures
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pipe.to(device)
    unet = pipe.unet
    unet.train()
    optimizer = method.build_optimizer(unet, lr=lr, weight_decay=weight_decay, total_steps=steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not getattr(pipe, "scheduler_config", None):
        raise ConfigError(f"pipe ({type(pipe).__name__}) has no scheduler_config: train() needs the DDPM noise "
                          "schedule the model was trained with (a dict, as TinyDiffusion and "
                          "StableDiffusionAdapter carry)")
    noise_sched = DDPMScheduler.from_config(pipe.scheduler_config)
    T = noise_sched.config.num_train_timesteps
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    scaler = torch.amp.GradScaler("cuda") if mixed_precision == "fp16" else None
    batches = _batches(dataset, batch_size, gen)
    rows = []
    last = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(range(1, last + 1), desc=desc or f"{method.name}", disable=not progress, leave=False)
    for step in bar:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        images, prompts = next(batches)
        if cond_dropout > 0:
            drop = torch.rand(len(prompts), generator=gen) < cond_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop)]
        x0 = images.to(device)
        if hasattr(pipe, "encode_images"):  # latent diffusion (Stable Diffusion): pixels -> VAE latents
            x0 = pipe.encode_images(x0)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, T, (len(x0),), generator=gen).to(device)
        xt = noise_sched.add_noise(x0, noise, t)
        cond = pipe.encode(prompts).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = unet(xt, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = memory_tracker.peak_bytes / 2**20 if memory_tracker is not None else float("nan")
        dt = time.perf_counter() - t0
        rows.append({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                     "step_time_s": dt, "peak_memory_mb": peak})
        if step % 10 == 0 or step == last:
            bar.set_postfix(loss=f"{pd.Series([r['loss'] for r in rows[-10:]]).mean():.4f}")
        if callback is not None:
            callback(step, pipe, optimizer)
    unet.eval()
    history = pd.DataFrame(rows)
    history.attrs["method"] = method.name
    return history
