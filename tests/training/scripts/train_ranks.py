"""Run sara_edu.training.train on the tiny course model; each process saves its final weights.

Used by tests/training/test_multiprocess.py, launched with one process or with
``torchrun --nproc_per_node 2`` / ``accelerate launch``: the runs must agree.
"""
import argparse
import json
from pathlib import Path

import torch

from sara_edu.io import save_tensors
from sara_edu.training import FullFineTuning, LoRA, SaRA, train
from sara_edu.world.data import StyleDataset
from sara_edu.world.model import TinyDiffusion, build_unet
from sara_edu.world.text import TinyTextEncoder

METHODS = {"full": lambda: FullFineTuning(), "lora": lambda: LoRA(rank=2),
           "sara": lambda: SaRA(fraction=0.1, progressive_iter="half")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="full")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--float64", action="store_true", help="compare algorithms, not float32 rounding")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    pipe = TinyDiffusion(build_unet(seed=0), TinyTextEncoder(seed=0))
    if a.float64:
        pipe.unet.double()
    data = StyleDataset("cyberpunk", digits=[0, 1, 2], limit_per_digit=5)  # 15 images: a short last batch
    history = train(pipe, data, METHODS[a.method](), steps=a.steps, stop_after=a.stop_after, lr=1e-3,
                    batch_size=a.batch_size, gradient_accumulation_steps=a.accumulate, cond_dropout=0.2,
                    seed=3, device="cpu", progress=False, checkpoint_dir=a.checkpoint_dir,
                    checkpoint_every=a.checkpoint_every, resume=a.resume)
    from accelerate import PartialState

    state = PartialState()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(dict(pipe.unet.state_dict()), out / f"rank{state.process_index}.safetensors")
    info = {"distributed_type": str(state.distributed_type), "num_processes": state.num_processes,
            "loss": history.loss.tolist()}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
