"""Notebook 05 (Stable Diffusion on a GPU): load the real model, or a tiny stand-in."""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..sd.load import SD15_ID, StableDiffusionAdapter, load_stable_diffusion
from ..sd.tiny import tiny_sd_pipeline


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
