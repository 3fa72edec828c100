"""A Stable Diffusion stand-in: the same diffusers/transformers classes, tiny and random.

:func:`tiny_sd_pipeline` builds SD's anatomy (CLIP tokenizer and text encoder,
VAE with 8x downsampling, cross-attention UNet), randomly initialised and a few
hundred kilobytes big, fully offline: tests use it, and notebook 05 falls back
to it when there is no GPU or no weights.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from .load import StableDiffusionAdapter, quiet_transformers

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

    from ..world.text import VOCAB

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
        with quiet_transformers():  # "ftfy not installed" is expected and harmless here
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

    from ..world.sampling import check_seed

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(check_seed(seed, hint="it seeds the random weights"))
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
