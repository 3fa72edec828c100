"""The diffusers training loop with SaRA (only the optimizer line changed), under Accelerate.

Launched by tests/sara/test_distributed.py with ``accelerate launch`` on 2 CPU
processes (gloo), and with plain ``python`` as the one-process reference
(``--per-device-batch`` twice as large: the same global batch). Two runs: with
``max_grad_norm`` 1.0 and 1e-9. Writes ``OUT/{rank{r}|single}.safetensors``
(weights after every optimizer step) and a JSON of facts per process.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from sara_edu.sara import SaRAAdamW
from sara_edu.world.model import TINY_UNET_CONFIG, build_unet

CONFIG = dict(TINY_UNET_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=8)
STEPS, ACCUMULATION, GLOBAL_BATCH = 6, 2, 4
# float64: in float32 a few entries whose gradient is ~Adam's eps (1e-8) get first updates that differ by ~1e-5
# between 1 and 2 processes (the summation order of the batch differs; Adam divides by |g| + eps). float64 shows
# what the test is about, that the synchronisation is exact.
DTYPE = torch.float64


def dataset():
    g = torch.Generator().manual_seed(0)
    n = STEPS * ACCUMULATION * GLOBAL_BATCH
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
                         torch.randn(n, 4, 32, generator=g), torch.randn(n, 3, 8, 8, generator=g))


def run(accelerator, max_grad_norm, per_device_batch):
    unet = build_unet(CONFIG, seed=0).to(DTYPE)
    unet.train()
    optimizer = SaRAAdamW(unet, lr=1e-3, fraction=0.1, rank_lambda=1e-2, progressive_iter=STEPS // 2,
                          weight_decay=1e-2)  # the diffusers script: torch.optim.AdamW(unet.parameters(), ...)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    loader = DataLoader(dataset(), batch_size=per_device_batch, shuffle=False)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    weights, norms = [], []
    for noisy, timesteps, text, noise in loader:
        with accelerator.accumulate(unet):
            pred = unet(noisy.to(DTYPE), timesteps, text.to(DTYPE)).sample
            loss = F.mse_loss(pred, noise.to(DTYPE), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            weights.append(torch.cat([p.detach().reshape(-1) for p in accelerator.unwrap_model(unet).parameters()]))
    inner = optimizer.optimizer  # AcceleratedOptimizer -> SaRAAdamW
    facts = {"norms": norms, "steps_done": inner.steps_done, "churn_froze": int(inner.churn.iloc[-1].froze),
             "bytes_communicated": inner.sync.bytes_communicated, "wrapped": type(unet).__name__}
    return torch.stack(weights), facts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per-device-batch", type=int, required=True)
    args = parser.parse_args()
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, cpu=True)
    tensors, facts = {}, {"distributed_type": str(accelerator.distributed_type),
                          "num_processes": accelerator.num_processes}
    for label, max_norm in (("clip1", 1.0), ("clip_tiny", 1e-9)):
        tensors[label], facts[label] = run(accelerator, max_norm, args.per_device_batch)
    name = f"rank{accelerator.process_index}" if accelerator.num_processes > 1 else "single"
    save_file(tensors, os.path.join(args.out, f"{name}.safetensors"))
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(facts, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
