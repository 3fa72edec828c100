"""Stable Diffusion: load it (hub id or local folder), a tiny offline stand-in, sampling."""
from .load import (
           SD15_ID,
           StableDiffusionAdapter,
           download_stable_diffusion,
           load_stable_diffusion,
)
from .sample import generate_sd
from .tiny import tiny_sd3_transformer, tiny_sd_pipeline

__all__ = ["SD15_ID", "StableDiffusionAdapter", "load_stable_diffusion", "download_stable_diffusion",
           "generate_sd", "tiny_sd_pipeline", "tiny_sd3_transformer"]
