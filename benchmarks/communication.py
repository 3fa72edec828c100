"""Bytes communicated per optimizer step: SaRA vs DDP-AdamW (full fine-tuning) vs LoRA, on 2 processes.

    python benchmarks/communication.py                  # course UNet measured, SD1.5 UNet counted
    python benchmarks/communication.py --real-sd15      # also measure SaRA and LoRA on the SD1.5 UNet (~18 GB RAM, ~7 min)

Data parallelism averages the gradients of what trains across the processes at
every optimizer step. What each method hands to ``torch.distributed`` per step:

* **full fine-tuning (DDP + AdamW)**: DDP all-reduces a dense gradient of every
  weight, ``4 · n_params`` bytes (fp32);
* **LoRA** (r=4 on the attention projections, PEFT, DDP): the adapter's gradients,
  ``4 · n_lora`` bytes;
* **SaRA** (10% of the entries): its own all-reduce of the selected gradient
  values plus one flag per trained weight, ``4 · (n_selected + n_weights)``
  bytes (fewer after progressive adjustment); the model is DDP-wrapped too, and
  DDP moves nothing for it.

Measured for real on 2 CPU processes (gloo, ``torchrun``): DDP's traffic through
a counting communication hook (every gradient bucket DDP all-reduces), SaRA's
by counting every ``torch.distributed.all_reduce`` call. The analytic formula
above is checked against those counts on the course UNet (they must be equal),
then applied to Stable Diffusion 1.5's UNet (``sara_edu/sd/sd15_unet_config.json``,
860M parameters, random weights: no download). Bytes are what is passed to the
collective per process; a ring all-reduce then sends about ``2·(N-1)/N`` times
that over the wire from each process.

Results: a table on stdout and ``benchmarks/results/communication_cpu.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.training.lora import LoRA  # noqa: E402
from sara_edu.training.method import FullFineTuning  # noqa: E402
from sara_edu.training.sara import SaRA  # noqa: E402

SD15_CONFIG = ROOT / "sara_edu" / "sd" / "sd15_unet_config.json"
RESULTS = ROOT / "benchmarks" / "results" / "communication_cpu.csv"
STEPS, PROGRESSIVE_AT = 4, 2  # SaRA adjusts after step 2: steps 1-2 before, 3-4 after
SARA_FRACTION = 0.1
METHODS = ("full", "lora", "sara")


# ---------------------------------------------------------------- models and methods


def build_model(name: str):
    """(unet, batch_fn) with the same random weights on every process."""
    if name == "course":
        from sara_edu.world.model import build_unet
        from sara_edu.world.text import EMBED_DIM

        unet = build_unet(seed=0)

        def batch(step, rank):
            g = torch.Generator().manual_seed(100 * step + rank)
            return (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 1000, (4,), generator=g),
                    torch.randn(4, 6, EMBED_DIM, generator=g))
        return unet, batch
    if name == "sd15":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(json.loads(SD15_CONFIG.read_text()))

        def batch(step, rank):
            g = torch.Generator().manual_seed(100 * step + rank)
            return (torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g),
                    torch.randn(1, 77, 768, generator=g))
        return unet, batch
    raise SystemExit(f"unknown model {name!r}")


def make_method(name: str):
    if name == "full":
        return FullFineTuning()
    if name == "lora":
        return LoRA(rank=4)  # the attention projections to_q/to_k/to_v/to_out.0, as diffusers' LoRA script
    if name == "sara":
        return SaRA(fraction=SARA_FRACTION, progressive_iter=PROGRESSIVE_AT)
    raise SystemExit(f"unknown method {name!r}")


def analytic_bytes(unet, method_name: str, optimizer) -> int:
    """Bytes per optimizer step each process passes to all_reduce (fp32 gradients), from counts alone."""
    if method_name in ("full", "lora"):  # DDP: every parameter that requires grad, dense
        return sum(4 * p.numel() for p in unet.parameters() if p.requires_grad)
    selection = optimizer.selection  # SaRA: selected values + one float32 flag per trained weight
    weights = sum(1 for n in selection.names if selection.indices[n].numel())
    return 4 * (selection.total_selected + weights)


# ---------------------------------------------------------------- one process of a 2-process run


def worker(model_name: str, method_name: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counted = {"python_all_reduce": 0, "ddp_buckets": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):  # SaRA's collectives go through this function
        counted["python_all_reduce"] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *args, **kwargs)

    unet, batch = build_model(model_name)
    unet.train()
    method = make_method(method_name)
    optimizer = method.build_optimizer(unet, lr=1e-4, weight_decay=1e-2, total_steps=STEPS)
    analytic = analytic_bytes(unet, method_name, optimizer)
    ddp = DDP(unet)

    def counting_hook(state, bucket):  # DDP's default allreduce hook, counting (and not via the patch below)
        buffer = bucket.buffer()
        counted["ddp_buckets"] += buffer.numel() * buffer.element_size()
        buffer.div_(dist.get_world_size())
        return real_all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, counting_hook)
    dist.all_reduce = counting_all_reduce
    per_step = []
    for step in range(STEPS):
        before = dict(counted)
        x, t, c = batch(step, rank)
        ddp(x, t, c).sample.pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        per_step.append({k: counted[k] - before[k] for k in counted})
    dist.all_reduce = real_all_reduce
    facts = {"per_step": per_step, "analytic": analytic,
             "trainable": sum(p.numel() for p in unet.parameters() if p.requires_grad)}
    if method_name == "sara":
        facts.update(selected=optimizer.selection.total_selected, trainable=optimizer.selection.total_selected,
                     after_adjustment=optimizer.num_trainable, sync_counter=optimizer.sync.bytes_communicated,
                     analytic_after=4 * (optimizer.num_trainable
                                         + sum(1 for s in optimizer.slots if s.idx.numel())))
    if rank == 0:
        Path(out).write_text(json.dumps(facts))
    dist.destroy_process_group()


def run_two_processes(model_name: str, method_name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "facts.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                   PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--worker", model_name, method_name, str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{model_name}/{method_name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------- counting on one process


def counted_only(model_name: str) -> dict[str, dict]:
    """Per method: trainable count and analytic bytes per step, without training (one process)."""
    import copy

    base, _ = build_model(model_name)
    out = {}
    for name in METHODS:
        unet = copy.deepcopy(base) if name != "sara" else base  # SaRA last: it can use the original
        optimizer = make_method(name).build_optimizer(unet, lr=1e-4, weight_decay=1e-2, total_steps=STEPS)
        trainable = (optimizer.selection.total_selected if name == "sara"
                     else sum(p.numel() for p in unet.parameters() if p.requires_grad))
        out[name] = {"trainable": trainable, "analytic": analytic_bytes(unet, name, optimizer)}
        del optimizer, unet
    return out


LABELS = {"full": "DDP + AdamW (full fine-tuning)", "lora": "LoRA r=4, attention (PEFT, DDP)",
          "sara": f"SaRA {SARA_FRACTION:.0%} (own all-reduce)"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-sd15", action="store_true", help="also run SaRA and LoRA on the SD1.5 UNet")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    import pandas as pd

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, gloo, 2 processes"
    rows, failures = [], []
    for name in METHODS:  # the course UNet: measured
        facts = run_two_processes("course", name)
        first, later = facts["per_step"][0], facts["per_step"][1]
        measured = later["ddp_buckets"] + later["python_all_reduce"]  # step 2: no one-off checks
        ok = measured == facts["analytic"]
        failures += [] if ok else [f"course/{name}: measured {measured} != analytic {facts['analytic']}"]
        rows.append({"model": "course UNet", "method": LABELS[name], "trainable": facts["trainable"],
                     "bytes_per_step": measured, "how": "measured", "analytic": facts["analytic"],
                     "ddp_bucket_bytes": later["ddp_buckets"], "first_step_bytes":
                     first["ddp_buckets"] + first["python_all_reduce"]})
        if name == "sara":
            after = facts["per_step"][-1]["python_all_reduce"] + facts["per_step"][-1]["ddp_buckets"]
            ok_after = after == facts["analytic_after"]
            failures += [] if ok_after else [f"course/sara after: {after} != {facts['analytic_after']}"]
            if facts["sync_counter"] != sum(s["python_all_reduce"] for s in facts["per_step"]):
                failures.append("SaRA's own byte counter disagrees with the counted all_reduce calls")
            rows.append({"model": "course UNet", "method": LABELS[name] + ", after progressive adjustment",
                         "trainable": facts["after_adjustment"], "bytes_per_step": after, "how": "measured",
                         "analytic": facts["analytic_after"], "ddp_bucket_bytes": 0, "first_step_bytes": None})
    sd15 = counted_only("sd15")
    real = {n: run_two_processes("sd15", n) for n in ("lora", "sara")} if args.real_sd15 else {}
    for name in METHODS:
        row = {"model": "SD1.5 UNet (860M)", "method": LABELS[name], "trainable": sd15[name]["trainable"],
               "bytes_per_step": sd15[name]["analytic"], "how": "counted (formula checked above)",
               "analytic": sd15[name]["analytic"], "ddp_bucket_bytes": None, "first_step_bytes": None}
        if name in real:
            later = real[name]["per_step"][1]
            row.update(bytes_per_step=later["ddp_buckets"] + later["python_all_reduce"], how="measured",
                       ddp_bucket_bytes=later["ddp_buckets"])
            if row["bytes_per_step"] != row["analytic"]:
                failures.append(f"sd15/{name}: measured {row['bytes_per_step']} != analytic {row['analytic']}")
        rows.append(row)
    table = pd.DataFrame(rows)
    for model, group in table.groupby("model", sort=False):
        full = float(group[group.method == LABELS["full"]].bytes_per_step.iloc[0])
        table.loc[group.index, "vs_ddp_adamw"] = group.bytes_per_step / full
    table["MB_per_step"] = table.bytes_per_step / 2**20
    table["machine"] = machine
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["model", "method", "trainable", "MB_per_step", "vs_ddp_adamw", "how"]]
              .to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nmachine: {machine}\nsaved {RESULTS.relative_to(ROOT)}")
    print("PASS: measured bytes equal the analytic count" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
