"""Where a training step's time goes, per method: forward, backward (SaRA's gradient hooks run inside it),
clipping and the optimizer step, on the SD-1.5-sized UNet (random weights). With ``step_in_backward``
the update runs inside "backward" and there is no clipping; a compiled step compiles in the warm-up steps.

    python benchmarks/step_phases.py --device cuda --batch-sizes 1,8
    python benchmarks/step_phases.py --device cpu --batch-sizes 1 --steps 2 --methods plain,sara   # slow

Every method trains its own copy of the same UNet in this one process; the
methods take turns step by step (interleaved), the first ``--warmup`` steps are
not counted, and each phase is timed between device synchronisations (process
CPU time on a CPU, wall time on CUDA). The medians go to a table on stdout and
to ``benchmarks/results/step_phases_<device>.csv``. ``memory_time.py`` measures
whole steps and memory, one process per method; this script says which phase
an overhead comes from.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_time import GRAPH_COLUMN, METHODS, SD15_NOISE, graph_stats_text, sd15_unet  # noqa: E402

from sara_edu.training.loop import pick_device  # noqa: E402

PHASES = ("forward", "backward", "clip", "optimizer.step", "zero_grad")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--methods", default="plain,full,sara,sara-compiled,sara-backward,sara-compact,"
                                              "sara-compact-compiled,sara-compact-backward,sara-compact8,lora4")
    parser.add_argument("--side", type=int, default=None, help="latent side (default: 64 on CUDA, 32 on CPU)")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(SD15_NOISE)
    side = args.side or (64 if cuda else 32)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        raise SystemExit(f"--methods: unknown method(s) {unknown or args.methods!r}; choose among {', '.join(METHODS)}")
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(batch, 4, side, side, generator=g).to(device)
        cond = torch.randn(batch, 77, 768, generator=g).to(device)
        runs = {}
        for key in keys:  # each method its own copy of the same weights (sd15_unet() loads the same file)
            unet = sd15_unet().to(device).train()
            method, _ = METHODS[key][1](unet)
            opt = method.build_optimizer(unet, lr=1e-5, weight_decay=1e-2, total_steps=1000)
            params = [p for grp in opt.param_groups for p in grp["params"]]
            runs[key] = (unet, opt, params, {p: [] for p in PHASES})
        for step in range(args.warmup + args.steps):
            t = torch.randint(0, 1000, (batch,), generator=g).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            xt = noise_sched.add_noise(x0, noise, t)
            order = keys[step % len(keys):] + keys[:step % len(keys)]
            for key in order:
                unet, opt, params, times = runs[key]
                marks = [None] * (len(PHASES) + 1)
                sync()
                marks[0] = clock()
                loss = torch.nn.functional.mse_loss(unet(xt, t, cond).sample, noise)
                sync()
                marks[1] = clock()
                loss.backward()
                sync()
                marks[2] = clock()
                with_grad = [p for p in params if p.grad is not None]
                # step_in_backward updated the weights inside backward(): there is nothing to clip (it refuses)
                if with_grad and not getattr(opt, "step_in_backward", False):
                    torch.nn.utils.clip_grad_norm_(with_grad, 1.0)
                sync()
                marks[3] = clock()
                opt.step()
                sync()
                marks[4] = clock()
                opt.zero_grad(set_to_none=True)
                sync()
                marks[5] = clock()
                if step >= args.warmup:
                    for i, phase in enumerate(PHASES):
                        times[phase].append(marks[i + 1] - marks[i])
        for key in keys:
            times = runs[key][3]
            row = {"batch": batch, "method": METHODS[key][0], "key": key}
            row.update({f"{p} (ms)": 1e3 * statistics.median(times[p]) for p in PHASES})
            row["step (ms)"] = sum(row[f"{p} (ms)"] for p in PHASES)
            graphs = graph_stats_text(runs[key][1])  # cuda_graphs: captures, replays, eager steps
            if graphs:
                row[GRAPH_COLUMN] = graphs
            rows.append(row)
        del runs
        if cuda:
            torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    for batch, part in table.groupby("batch"):
        ref = part.loc[part.key == "plain", "step (ms)"]
        if len(ref):
            table.loc[part.index, "x plain"] = part["step (ms)"] / float(ref.iloc[0])
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"step_phases_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4g")
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\nmedian ms per phase over {args.steps} interleaved steps ({args.warmup} warm-up), {name}, "
          f"SD1.5-sized UNet, 4x{side}x{side} latents, {torch.__version__}")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(table.drop(columns=["key"]).to_string(index=False))
    print(f"saved {out}")
    return table


if __name__ == "__main__":
    main()
