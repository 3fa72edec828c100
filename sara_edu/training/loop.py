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

import contextlib
import inspect
import math
import time

import pandas as pd
import torch

from ..errors import ConfigError, DataError
from .finite import check_finite_weights, pipe_parameters
from .method import FullFineTuning, TrainingMethod

HISTORY_COLUMNS = ["step", "loss", "lr", "step_time_s", "peak_memory_mb"]


def pick_device(device=None) -> torch.device:
    """CUDA if present (or the device asked for, checked to exist here), else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usage = "pass device='cpu', 'cuda', 'cuda:N' or None (CUDA when there is a GPU, else the CPU)"
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"device={device!r} is not a device torch knows ({str(e).splitlines()[0][:120]}): "
                          f"{usage}") from e
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device={device!r} asks for a GPU, but {why}: pass device='cpu' or None (the CPU "
                              "here), or run on a machine with a CUDA GPU.")
        if chosen.index is not None and chosen.index >= count:
            raise ConfigError(f"device={device!r}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}; "
                              f"{usage}")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} asks for Apple's GPU, which is not available here: {usage}")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r}: sara-edu runs on the CPU, CUDA or mps; {usage}")
    return chosen


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_step_in_backward(max_grad_norm, accumulation, world, mixed_precision) -> None:
    """SaRA(step_in_backward=True) updates each weight inside backward(): what needs every gradient first cannot be."""
    problems = []
    if max_grad_norm is not None:
        problems.append(f"max_grad_norm={max_grad_norm!r}: clipping needs the global norm before any update; pass "
                        "max_grad_norm=None")
    if accumulation > 1:
        problems.append(f"gradient_accumulation_steps={accumulation}: use 1")
    if world > 1:
        problems.append(f"{world} processes: run on one")
    if mixed_precision == "fp16":
        problems.append("mixed_precision='fp16' (its GradScaler unscales after backward): use 'bf16' or None")
    if problems:
        raise ConfigError("SaRA(step_in_backward=True) updates each weight inside the backward pass, so: "
                          + "; ".join(problems) + ". Or use step_in_backward=False.")


def _check(steps, lr, batch_size, warmup_steps, max_grad_norm, cond_dropout, mixed_precision, weight_decay,
           gradient_accumulation_steps, checkpoint_every, keep_checkpoints=None, stop_after=None):
    problems = []
    if not _integer(steps) or steps < 1:
        problems.append(f"steps must be a positive integer, got {steps!r}")
    if not (_number(lr) and lr > 0):
        problems.append(f"lr (the learning rate) must be a positive number, e.g. 1e-4, got {lr!r}")
    if not _integer(batch_size) or batch_size < 1:
        problems.append(f"batch_size must be a positive integer, got {batch_size!r}")
    if not _integer(warmup_steps) or warmup_steps < 0 or (_integer(steps) and warmup_steps >= max(steps, 1) and steps > 1):
        problems.append(f"warmup_steps must be an integer in [0, steps), got {warmup_steps!r}")
    if max_grad_norm is not None and not (_number(max_grad_norm) and max_grad_norm > 0):
        problems.append(f"max_grad_norm must be a positive finite number or None (no clipping), got {max_grad_norm!r}")
    if not (_number(cond_dropout) and 0 <= cond_dropout < 1):
        problems.append(f"cond_dropout must be in [0, 1), got {cond_dropout!r}")
    if not (_number(weight_decay) and weight_decay >= 0):
        problems.append(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if mixed_precision not in (None, "no", "bf16", "fp16"):
        problems.append(f"mixed_precision must be None, 'bf16' or 'fp16', got {mixed_precision!r}")
    if not _integer(gradient_accumulation_steps) or gradient_accumulation_steps < 1:
        problems.append(f"gradient_accumulation_steps must be a positive integer, got {gradient_accumulation_steps!r}")
    if checkpoint_every is not None and (not _integer(checkpoint_every) or checkpoint_every < 1):
        problems.append(f"checkpoint_every must be a positive integer or None, got {checkpoint_every!r}")
    if keep_checkpoints is not None and (not _integer(keep_checkpoints) or keep_checkpoints < 1):
        problems.append(f"keep_checkpoints must be a positive integer (how many to keep) or None (all), "
                        f"got {keep_checkpoints!r}")
    if stop_after is not None and (not _integer(stop_after) or stop_after < 1):
        problems.append(f"stop_after must be a positive integer (steps to run) or None, got {stop_after!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def _check_weights_dtype(unet) -> None:
    dtypes = {p.dtype for p in unet.parameters() if p.is_floating_point()}
    low = sorted(str(d).removeprefix("torch.") for d in dtypes & {torch.float16, torch.bfloat16})
    if low:
        raise ConfigError(
            f"the UNet's weights are {', '.join(low)}: train() keeps float32 weights, because AdamW's small updates "
            "vanish when added to half-precision weights. Convert it first (pipe.unet.float(), or load it in "
            "float32) and pass mixed_precision='bf16' or 'fp16' on a GPU for half-precision speed.")


def _check_weights_finite(pipe) -> None:
    """NaN or inf weights before the first step make every loss NaN whatever the learning rate: say so first."""
    check_finite_weights(pipe_parameters(pipe), "the model's weights hold, before any training step,",
                         "Lowering the learning rate will not help: they come from a damaged model file or an "
                         "earlier diverged run. Reload the model (load_pretrained() or load_stable_diffusion(); "
                         "re-create or re-download damaged files).")


def _stack(dataset, indices):
    items = [dataset[i] for i in indices]
    return torch.stack([it["pixel_values"] for it in items]), [it["prompt"] for it in items]


def train(pipe, dataset, method: TrainingMethod | None = None, *, steps: int = 200, lr: float = 1e-4,
          batch_size: int = 32, weight_decay: float = 1e-2, warmup_steps: int = 0,
          max_grad_norm: float | None = 1.0, seed: int = 0, device=None, mixed_precision: str | None = None,
          cond_dropout: float = 0.0, gradient_accumulation_steps: int = 1, progress: bool = True,
          desc: str | None = None, callback=None, memory_tracker=None, stop_after: int | None = None,
          checkpoint_dir=None, checkpoint_every: int | None = None, keep_checkpoints: int | None = None,
          resume: bool = False, run_settings: dict | None = None) -> pd.DataFrame:
    """Fine-tune ``pipe.unet`` on ``dataset`` with ``method``; return the history.

    ``pipe`` is a :class:`~sara_edu.world.model.TinyDiffusion` (or anything with ``unet``,
    ``encode(prompts)``, ``scheduler_config``, ``to(device)`` and optionally
    ``encode_images(pixels) -> latents`` for latent diffusion). The history has one row per
    optimizer step: ``step, loss, lr, step_time_s, peak_memory_mb``. On CUDA the peak is the
    allocator's; on CPU it comes from ``memory_tracker`` when one is given (see
    :mod:`sara_edu.measure.memory`), else it is NaN.

    **Several processes.** Launched with ``torchrun`` or ``accelerate launch``, every process
    runs this same call; ``batch_size`` is the *global* batch of one optimizer step, split over
    the processes and the ``gradient_accumulation_steps`` micro-batches. Every process draws
    the global batch, noise, timesteps and the VAE's latent samples from the same seeded
    generator (one per image of the global batch for the VAE) and keeps its share,
    so the run equals a one-process run with the same ``batch_size`` (up to float rounding).

    **Checkpoints.** With ``checkpoint_dir`` and ``checkpoint_every``, a checkpoint is written
    every that many steps (see :mod:`sara_edu.training.checkpoint`); ``resume=True`` continues
    from the latest complete one (``pipe`` must be a fresh copy of the same base model). The
    checkpoint records a fingerprint of the base weights and the run's settings (these arguments,
    the dataset's size, and ``run_settings``, which a caller names as its user gave them); resuming
    with another base or other settings, resuming where there is no checkpoint, and starting a new
    run where another run's checkpoints lie are refused with a clear error.

    ``stop_after`` runs only the first steps of a ``steps``-long schedule (the learning-rate
    schedule is still the one for ``steps``). ``callback(step, pipe, optimizer)`` runs after
    every optimizer step. ``cond_dropout`` replaces that fraction of prompts by the empty
    prompt, which classifier-free guidance needs.

    **When a run stops early.** On Ctrl-C the steps done so far are kept: the partial history is
    returned (``history.attrs["interrupted"]`` says at which step). If the loss becomes NaN or
    infinite, :class:`FloatingPointError` is raised with the partial history as its ``history``
    attribute; the weights are those after the last good step. When nothing is left to train
    (progressive adjustment froze every entry), :class:`ConfigError` is raised the same way. Either way SaRA or the selective
    baseline is detached, leaving a plain model with the trained weights.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    from .batches import GlobalBatches, shares
    from .checkpoint import base_fingerprint, check_resume, load_checkpoint, save_checkpoint

    method = method or FullFineTuning()
    k = gradient_accumulation_steps
    _check(steps, lr, batch_size, warmup_steps, max_grad_norm, cond_dropout, mixed_precision, weight_decay, k,
           checkpoint_every, keep_checkpoints, stop_after)
    if (checkpoint_every is not None or resume) and checkpoint_dir is None:
        raise ConfigError("checkpoint_every and resume need checkpoint_dir (the folder for the checkpoints)")
    if len(dataset) == 0:
        raise DataError("the dataset is empty: nothing to train on")
    checkpointing = checkpoint_dir is not None and (checkpoint_every is not None or resume)
    settings = {**(run_settings or {}), "steps": steps, "lr": lr, "batch_size": batch_size,
                "weight_decay": weight_decay, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
                "seed": seed, "cond_dropout": cond_dropout, "gradient_accumulation_steps": k,
                "mixed_precision": mixed_precision, "dataset size": len(dataset)}
    found = check_resume(checkpoint_dir, resume=resume, settings=settings,
                         saving=checkpoint_every is not None) if checkpointing else None
    if not getattr(pipe, "scheduler_config", None):
        raise ConfigError(f"pipe ({type(pipe).__name__}) has no scheduler_config: train() needs the DDPM noise "
                          "schedule the model was trained with (a dict, as TinyDiffusion and "
                          "StableDiffusionAdapter carry)")
    device = pick_device(device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        device = accelerator.device
    if batch_size < world * k:
        raise ConfigError(f"batch_size={batch_size} is smaller than processes x gradient_accumulation_steps "
                          f"({world} x {k}): every process needs at least one sample per micro-batch")
    if mixed_precision in ("bf16", "fp16") and device.type != "cuda":
        mixed_precision = None  # autocast on CPU is slow and not what the course measures
    if getattr(method, "step_in_backward", False):
        _check_step_in_backward(max_grad_norm, k, world, mixed_precision)
    _check_weights_dtype(pipe.unet)
    _check_weights_finite(pipe)
    base = base_fingerprint(pipe.unet) if checkpointing else None  # before the method changes the model
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pipe.to(device)
    unet = pipe.unet
    dtype = next(p.dtype for p in unet.parameters() if p.is_floating_point())
    unet.train()
    optimizer = method.build_optimizer(unet, lr=lr, weight_decay=weight_decay, total_steps=steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    model = accelerator.prepare_model(unet) if world > 1 else unet  # DDP on several processes
    params = [p for g in optimizer.param_groups for p in g["params"]]
    noise_sched = DDPMScheduler.from_config(pipe.scheduler_config)
    T = noise_sched.config.num_train_timesteps
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    scaler = torch.amp.GradScaler("cuda") if mixed_precision == "fp16" else None
    batches = GlobalBatches(len(dataset), batch_size, gen, min_size=world * k)
    rows: list[dict] = []
    done = 0
    if found is not None:
        done, rows = load_checkpoint(found, method=method, unet=unet, optimizer=optimizer, scheduler=scheduler,
                                     batches=batches, base_sha256=base)
    last = steps if stop_after is None else min(steps, stop_after)
    if done > last:
        raise ConfigError(f"the checkpoint {found} has done {done} steps, more than this run's "
                          f"{'stop_after' if last < steps else 'steps'}={last}: resume with a larger one")
    bar = tqdm(range(done + 1, last + 1), desc=desc or f"{method.name}", disable=not progress or rank != 0,
               leave=False)
    step = done
    try:
        for step in bar:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            indices = batches.next()
            n = len(indices)
            # the random draws are those of the global batch, in one fixed order, on every process
            drop = torch.rand(n, generator=gen) < cond_dropout if cond_dropout > 0 else None
            parts = shares(indices, k, world, rank)
            mine = [pos for part in parts for pos in part]
            images, prompts = _stack(dataset, [indices[pos] for pos in mine])
            if drop is not None:
                prompts = ["" if drop[pos] else prompt for pos, prompt in zip(mine, prompts)]
            x0 = images.to(device)
            if hasattr(pipe, "encode_images"):  # latent diffusion (Stable Diffusion): pixels -> VAE latents
                # the VAE samples its latents too: one generator per global position, seeded from gen,
                # so each image's draw does not depend on which process encodes it
                seeds = torch.randint(0, 2**62, (n,), generator=gen)
                if "generator" in inspect.signature(pipe.encode_images).parameters:
                    x0 = pipe.encode_images(x0, generator=[torch.Generator().manual_seed(int(seeds[pos]))
                                                           for pos in mine])
                else:
                    x0 = pipe.encode_images(x0)
                x0 = x0.contiguous()  # channels-last latents crash a CPU GroupNorm backward
            noise = torch.randn((n, *x0.shape[1:]), generator=gen)
            t = torch.randint(0, T, (n,), generator=gen)
            row_of = {pos: i for i, pos in enumerate(mine)}
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for j, part in enumerate(parts):
                rows_j = [row_of[pos] for pos in part]
                x0_j, noise_j, t_j = x0[rows_j], noise[part].to(device), t[part].to(device)
                xt = noise_sched.add_noise(x0_j, noise_j.to(x0_j.dtype), t_j)
                cond = pipe.encode([prompts[r] for r in rows_j]).to(device)
                sync = accelerator.no_sync(model) if (world > 1 and j < k - 1) else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        pred = model(xt.to(dtype), t_j, cond.to(dtype)).sample
                    if world == 1 and k == 1:
                        loss = torch.nn.functional.mse_loss(pred.float(), noise_j.float())
                        per_sample_sum = loss.detach().double() * n
                    else:
                        # mean over the global batch: each process sums its share and DDP averages the
                        # processes, so scale by world/n (shares may differ by one sample)
                        per_sample = torch.nn.functional.mse_loss(pred.float(), noise_j.float(), reduction="none")
                        per_sample_sum = per_sample.flatten(1).mean(1).sum()
                        loss = per_sample_sum * world / n
                        per_sample_sum = per_sample_sum.detach().double()
                    bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device)
                    if world > 1:  # every process must stop together, or the others wait for ever
                        bad = accelerator.reduce(bad, "sum")
                    if bad.item():
                        raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning "
                                                 "rate (the weights are those after the previous step)")
                    if not loss.requires_grad:  # backward() would fail with a bare torch RuntimeError
                        raise ConfigError(_nothing_trains(method, step))
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += per_sample_sum
            if scaler is not None:
                scaler.unscale_(optimizer)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if world > 1:
                loss_sum = accelerator.reduce(loss_sum, "sum")
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                peak = memory_tracker.peak_bytes / 2**20 if memory_tracker is not None else float("nan")
            rows.append({"step": step, "loss": float(loss_sum) / n, "lr": scheduler.get_last_lr()[0],
                         "step_time_s": time.perf_counter() - t0, "peak_memory_mb": peak})
            if step % 10 == 0 or step == last:
                bar.set_postfix(loss=f"{pd.Series([r['loss'] for r in rows[-10:]]).mean():.4f}")
            if callback is not None:
                callback(step, pipe, optimizer)
            if checkpoint_every is not None and step % checkpoint_every == 0:
                if accelerator.is_main_process:
                    save_checkpoint(checkpoint_dir, step=step, method=method, unet=unet, optimizer=optimizer,
                                    scheduler=scheduler, batches=batches, history=rows, keep=keep_checkpoints,
                                    run={"base_sha256": base, "settings": settings})
                accelerator.wait_for_everyone()
    except KeyboardInterrupt:
        _stop(method, unet)
        history = _history(rows, method)
        history.attrs["interrupted"] = f"interrupted during step {step} of {last}; {len(rows)} steps done"
        print(f"train(): {history.attrs['interrupted']}. Returning the history so far; the model keeps the "
              "weights of the steps done" + (" (the method is detached)" if hasattr(method, "detach") else "") + ".")
        return history
    except (FloatingPointError, ConfigError) as error:
        _stop(method, unet)
        error.history = _history(rows, method)
        raise
    finally:
        bar.close()
    unet.eval()
    return _history(rows, method)


def _nothing_trains(method, step) -> str:
    """Why the loss depends on no trainable parameter, and what to change."""
    churn = getattr(getattr(method, "optimizer", None), "churn", None)
    if churn is not None and int(churn["continue"].iloc[-1]) == 0:
        return (f"nothing trains any more at step {step}: progressive adjustment froze every trained entry (all "
                f"{int(churn['selected'].iloc[-1]):,} grew to |w| >= θ). The weights keep the steps done; for a "
                "longer run give a larger threshold or fraction, or progressive_iter=None.")
    return (f"the loss depends on no trainable parameter at step {step}: method {method.name!r} left nothing "
            "trainable on the model's forward path (its weights lie in parts the forward pass does not use). "
            "Train other weights (target_modules / layer_types, a larger threshold or fraction).")


def _stop(method, unet) -> None:
    """After a run stopped early: a plain model with the weights of the steps done."""
    unet.eval()
    detach = getattr(method, "detach", None)
    if detach is not None and getattr(method, "optimizer", None) is not None:
        detach()


def _history(rows, method) -> pd.DataFrame:
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    history.attrs["method"] = method.name
    return history
