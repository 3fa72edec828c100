"""Recipe: pretrain the course model on plain digits (the shipped ``data/tiny_diffusion``).

    python -m sara_edu.world.recipes.pretrain            # the shipped run (56 min measured on a busy 2-core CPU)
    python -m sara_edu.world.recipes.pretrain --steps 3 --out /tmp/x   # a smoke run

Only plain prompts ("a digit 3") are seen; the five style words stay unused, like a
concept the text encoder knows but the UNet never learned to draw. 10% of prompts
are dropped to the empty prompt so classifier-free guidance works. The weights are
an exponential moving average (EMA) of the training weights, as in most diffusion
recipes. Intermediate checkpoints (EMA, stored as float16 to keep the repo small)
let the course compare which weights are small across training.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ...io import save_tensors
from ...training.loop import train
from ..data import TensorImageDataset, load_digits_images
from ..model import TINY_UNET_CONFIG, TinyDiffusion, build_unet, save_pretrained
from ..paths import PRETRAINED_DIR
from ..text import TinyTextEncoder

DEFAULTS = {"steps": 3000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 200, "weight_decay": 1e-2,
            "cond_dropout": 0.1, "ema_decay": 0.999, "seed": 0, "checkpoint_fractions": [0.05, 0.25, 0.5, 0.75]}


def pretrain(out=PRETRAINED_DIR, steps=DEFAULTS["steps"], batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"],
             warmup_steps=DEFAULTS["warmup_steps"], weight_decay=DEFAULTS["weight_decay"],
             cond_dropout=DEFAULTS["cond_dropout"], ema_decay=DEFAULTS["ema_decay"], seed=DEFAULTS["seed"],
             checkpoint_fractions=tuple(DEFAULTS["checkpoint_fractions"]), progress=True, stop_after=None):
    """Run the recipe; return the history DataFrame. Files go to ``out`` only if it is not None.

    ``stop_after=k`` runs only the first k steps of the same schedule (tests use it
    to check that the shipped files came from this recipe).
    """
    images, labels, prompts = load_digits_images("train", style=None)
    dataset = TensorImageDataset(images, prompts, labels)
    pipe = TinyDiffusion(build_unet(TINY_UNET_CONFIG, seed=seed), TinyTextEncoder(seed=seed))
    ema = copy.deepcopy(pipe.unet).requires_grad_(False)
    ckpt_steps = {max(1, round(f * steps)): f for f in checkpoint_fractions}
    out = Path(out) if out is not None else None

    def update_ema(step, pipe, optimizer):
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up of the average, as in diffusers' EMAModel
        with torch.no_grad():
            for e, p in zip(ema.parameters(), pipe.unet.parameters()):
                e.lerp_(p, 1 - decay)
        if out is not None and step in ckpt_steps:
            save_tensors({k: v.half() for k, v in ema.state_dict().items()},
                         out / "checkpoints" / f"step_{step:06d}.safetensors", {"step": step})

    t0 = time.time()
    history = train(pipe, dataset, steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                    warmup_steps=warmup_steps, seed=seed, device="cpu", cond_dropout=cond_dropout,
                    progress=progress, desc="pretrain", callback=update_ema,
                    stop_after=stop_after)
    minutes = (time.time() - t0) / 60
    if out is not None:
        recipe = dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, cond_dropout=cond_dropout, ema_decay=ema_decay, seed=seed,
                      checkpoint_fractions=list(checkpoint_fractions))
        save_pretrained(TinyDiffusion(ema, pipe.text_encoder), out,
                        {"recipe": recipe, "pretrain_minutes": round(minutes, 1),
                         "torch": torch.__version__, "threads": torch.get_num_threads()})
        history[["step", "loss", "step_time_s"]].to_csv(out / "train_log.csv", index=False)
    return history


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(PRETRAINED_DIR))
    for k, v in DEFAULTS.items():
        if k != "checkpoint_fractions":
            p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    h = pretrain(out=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                 weight_decay=a.weight_decay, cond_dropout=a.cond_dropout, ema_decay=a.ema_decay, seed=a.seed)
    print(json.dumps({"final_loss_avg100": float(h.loss.tail(100).mean()), "steps": len(h)}))


if __name__ == "__main__":
    main()
