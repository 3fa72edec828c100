"""Memory and time of fine-tuning methods: full FT, LoRA, selective, SaRA (and plain fwd+bwd).

    python benchmarks/memory_time.py                     # both models, default steps
    python benchmarks/memory_time.py --models course --steps 20
    python benchmarks/memory_time.py --quick             # smoke run: course model, few steps

Every method runs through the course's own loop (:func:`sara_edu.training.train`)
on a fresh copy of the same model, so the comparisons are fair:

* memory: a :class:`~sara_edu.measure.memory.MemoryTracker` counts every tensor created
  from the moment the method is attached (parameter selection included)
  through the first ``TRACKED_STEPS`` training steps (the optimizer state exists
  from step 1 on, so step 2 is a steady-state step; SaRA's progressive
  re-selection is placed at the end of step 2 so that it is measured too).
  The peak *above the frozen weights* is reported with its breakdown.
* time: the median step time of the ``--steps`` steps that follow, run without
  the tracker (its per-op bookkeeping would slow small models down).

The "plain fwd+bwd" row is the reference: forward, backward computing dense
weight gradients, free them; no clipping, no optimizer. SaRA's claim is that
its training step costs about that much.

Results: a table on stdout and ``benchmarks/results/memory_time_<device>.csv``.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sara_edu.training.lora import LoRA, lora_rank_matching, save_lora  # noqa: E402
from sara_edu.measure.memory import MB, MemoryTracker  # noqa: E402
from sara_edu.training.method import FullFineTuning, TrainingMethod
from sara_edu.training.loop import pick_device, train  # noqa: E402

TRACKED_STEPS = 2
SD15_CONFIG = ROOT / "sara_edu" / "sd" / "sd15_unet_config.json"
CACHE = Path(tempfile.gettempdir()) / "sara_edu_bench"


# ---------------------------------------------------------------- models
@dataclass
class BenchPipe:
    """The minimum :func:`train` needs: a UNet, fixed text conditioning, a noise schedule."""

    unet: nn.Module
    cond: torch.Tensor  # (batch, tokens, dim), made before tracking: conditioning is not what we measure
    scheduler_config: dict | None = None

    def to(self, device):
        self.unet.to(device)
        self.cond = self.cond.to(device)
        return self

    def encode(self, prompts):
        return self.cond[: len(prompts)]


class RandomSamples(torch.utils.data.Dataset):
    """``n`` fixed random "images" (pixels or latents), made up front."""

    def __init__(self, n, shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, *shape, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "prompt": ""}


def course_model():
    """The shipped course model (or a random one with its config if it is not there yet)."""
    from sara_edu.errors import CheckpointError
    from sara_edu.world.model import TinyDiffusion, build_unet, load_pretrained

    try:
        pipe = load_pretrained()
    except CheckpointError:
        print("(shipped course model not found: using a randomly initialised one)")
        pipe = TinyDiffusion(build_unet(seed=0))
    return pipe


def sd15_unet(seed=0) -> nn.Module:
    """An SD1.5-sized UNet2DConditionModel with random weights, no download.

    PyTorch's default init of 860M numbers takes tens of seconds on a small CPU,
    and every method needs a fresh copy: we build the model on the meta device
    and load the same random weights from a cached safetensors file (made once,
    with the default init's distributions: U(±1/sqrt(fan_in)), norms 1/0).
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    config = json.loads(SD15_CONFIG.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    path = CACHE / f"sd15_random_seed{seed}.safetensors"
    if not path.exists():
        print(f"(creating random SD1.5-sized weights once, cached in {path})")
        unet.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            fan_in = {}
            for name, m in unet.named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    fan_in[name] = m.weight[0].numel()
            for name, p in unet.named_parameters():
                module, _, kind = name.rpartition(".")
                if module in fan_in:
                    bound = 1 / math.sqrt(fan_in[module])
                    p.uniform_(-bound, bound, generator=g)
                else:  # GroupNorm / LayerNorm
                    p.fill_(1.0 if kind == "weight" else 0.0)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp))
        tmp.replace(path)
        return unet
    unet.load_state_dict(load_file(str(path)), assign=True)
    return unet


def make_setup(model: str, device):
    """(fresh pipe factory, dataset, batch size, description) for a model name."""
    if model == "course":
        first = course_model()
        state = {k: v.clone() for k, v in first.unet.state_dict().items()}
        config = dict(first.unet.config)
        cond = first.encode(["a digit 3"] * 16).detach()
        sched = first.scheduler_config
        size = config["sample_size"]

        def fresh():
            from sara_edu.world.model import build_unet

            unet = build_unet({k: v for k, v in config.items() if not k.startswith("_")}, seed=None)
            unet.load_state_dict(state)
            return BenchPipe(unet, cond.clone(), sched)

        return fresh, RandomSamples(64, (3, size, size)), 16, "course model, batch 16 x 3x16x16"
    if model == "sd15":
        side = 64 if device.type == "cuda" else 32
        cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
        return (lambda: BenchPipe(sd15_unet(), cond.clone(), None), RandomSamples(4, (4, side, side)), 1,
                f"SD1.5-sized UNet (random), batch 1 x 4x{side}x{side} latents")
    raise SystemExit(f"unknown model {model!r}: use course and/or sd15")


# --------------------------------------------------------------- methods
class _GradientsOnly(torch.optim.Optimizer):
    """The reference "optimizer": holds nothing, updates nothing, frees the dense gradients.

    train() clips the grads of ``param_groups`` (here a single empty placeholder,
    so no clipping) and needs a real Optimizer for its LR schedule.
    """

    def __init__(self, unet, on_step=None):
        super().__init__([torch.zeros(0, requires_grad=True)], {"lr": 0.0})
        self.unet_params = [p for p in unet.parameters()]
        self.on_step = on_step

    def step(self, closure=None):
        if self.on_step is not None:
            self.on_step(self.unet_params)

    def zero_grad(self, set_to_none=True):
        for p in self.unet_params:
            p.grad = None


@dataclass
class PlainForwardBackward(TrainingMethod):
    """Reference: forward + backward with dense weight gradients for every weight; no update."""

    name: str = "plain fwd+bwd"
    tracker: MemoryTracker | None = None

    def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
        unet.requires_grad_(True)
        tag = None if self.tracker is None else (lambda ps: self.tracker.classify([p.grad for p in ps], "gradients"))
        return _GradientsOnly(unet, tag)

    def trainable_parameters(self, unet):
        return 0


def method_factories(have_sara: bool):
    """(row name, factory() -> TrainingMethod), in run order.

    Factories of None are built in :func:`benchmark_model`: the reference, and the
    rank-matched LoRA, which needs SaRA's trainable count (so SaRA runs first).
    """
    rows = [("plain fwd+bwd (reference)", None), ("full fine-tuning", FullFineTuning),
            ("LoRA r=4", lambda: LoRA(rank=4))]
    if have_sara:
        from sara_edu.training.sara import SaRA
        from sara_edu.training.selective import SelectiveFineTuning

        rows += [("selective 10% (no UB)", lambda: SelectiveFineTuning(fraction=0.1)),
                 ("SaRA 10% (no nuclear)", lambda: SaRA(fraction=0.1, rank_lambda=0.0, progressive_iter=TRACKED_STEPS)),
                 ("SaRA 10% + nuclear", lambda: SaRA(fraction=0.1, progressive_iter=TRACKED_STEPS))]
    rows += [("LoRA rank-matched", None)]
    return rows


def lora_matched(unet, n_params):
    match = lora_rank_matching(unet, n_params)
    label = f"LoRA r={match.rank} (matched{', widened targets' if match.widened else ''})"
    return LoRA(rank=match.rank, target_modules=match.target_modules), label


# ------------------------------------------------------------------- run
def selected_count(method, unet) -> int:
    """Trainable numbers as selected at attach time (SaRA's progressive step later freezes some)."""
    opt = getattr(method, "optimizer", None)
    selection = getattr(opt, "selection", None)
    if selection is not None:
        return int(selection.total_selected)
    return int(method.trainable_parameters(unet))


def saved_file_bytes(name, method, unet, folder: Path) -> float:
    """Size of what this method would ship: adapter, sparse values or the full state dict."""
    if name.startswith("plain"):
        return math.nan
    path = folder / "out.safetensors"
    if isinstance(method, LoRA):
        save_lora(unet, path)
    elif hasattr(method, "save"):  # SaRA / selective: sparse (positions + values)
        try:
            method.save(path)
        except Exception as e:  # report the size anyway: the raw bytes of positions + values
            print(f"  ! {name}: save failed ({type(e).__name__}: {e}); reporting the raw size of its "
                  "positions + values instead", flush=True)
            from sara_edu.sara.selection import index_dtype_for

            own = dict(unet.named_parameters())
            return sum(idx.numel() * (torch.empty(0, dtype=index_dtype_for(own[n].numel())).element_size()
                                      + own[n].element_size())
                       for n, idx in method.optimizer.trained_entries().items())
    else:  # full fine-tuning: the whole fp32 state dict
        n = sum(t.numel() * t.element_size() for t in unet.state_dict().values())
        if n > 2**30:  # don't write gigabytes: safetensors = a small JSON header + the raw tensors
            return n
        from sara_edu.io import save_tensors

        save_tensors(unet.state_dict(), path)
    size = path.stat().st_size
    path.unlink()
    return size


def run_one(name, method, fresh, dataset, batch_size, steps, device, folder):
    pipe = fresh()
    unet = pipe.unet
    tracker = MemoryTracker(device=device, model=unet)
    if isinstance(method, PlainForwardBackward):
        method.tracker = tracker

    cpu_marks = {}  # step -> process CPU seconds when it ended

    def stop_tracking(step, pipe, optimizer):
        if step == TRACKED_STEPS:
            tracker.stop()
        cpu_marks[step] = time.process_time()

    with tracker:
        history = train(pipe, dataset, tracker.watching(method), steps=TRACKED_STEPS + steps, lr=1e-4,
                        batch_size=batch_size, seed=0, device=device, progress=False, callback=stop_tracking)
    report = tracker.report(unet)
    timed = history.step_time_s.iloc[TRACKED_STEPS:]
    cpu = pd.Series([cpu_marks[k] - cpu_marks[k - 1] for k in range(TRACKED_STEPS + 1, TRACKED_STEPS + steps + 1)])
    row = {"method": name, "trainable parameters": selected_count(method, unet),
           "peak above frozen (MB)": report.peak_above_frozen / MB,
           "frozen weights (MB)": report.frozen_weights / MB,
           "trainable values (MB)": report.trainable_values / MB,
           "optimizer state (MB)": report.optimizer_state / MB,
           "gradients (MB)": report.gradients / MB,
           "method buffers (MB)": report.method_buffers / MB,
           "activations + transients (MB)": report.activations_transients / MB,
           "median step (s)": float(timed.median()),
           "median step CPU (s)": float(cpu.median()),
           "saved file (MB)": saved_file_bytes(name, method, unet, folder) / MB}
    del pipe, unet, tracker, history, report
    return row


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def benchmark_model(model, steps, device, folder, only=None):
    fresh, dataset, batch_size, description = make_setup(model, device)
    print(f"\n== {description}; {TRACKED_STEPS} tracked + {steps} timed steps per method ==", flush=True)
    have_sara = (ROOT / "sara_edu" / "sara.py").exists() and (ROOT / "sara_edu" / "selective.py").exists()
    rows, sara_count = [], None
    for name, factory in method_factories(have_sara):
        if only and not any(name.lower().startswith(o) for o in only):
            continue
        t0 = time.perf_counter()
        try:
            if name.startswith("plain"):
                method = PlainForwardBackward()
            elif name.startswith("LoRA rank-matched"):
                probe = fresh()
                n = sara_count or round(0.1 * sum(p.numel() for p in probe.unet.parameters()))
                method, name = lora_matched(probe.unet, n)
                del probe
            else:
                method = factory()
            row = run_one(name, method, fresh, dataset, batch_size, steps, device, folder)
            if name.startswith("SaRA") and sara_count is None:
                sara_count = row["trainable parameters"]
        except Exception as e:  # one broken method should not hide the others' numbers
            traceback.print_exc()
            row = {"method": name, "error": f"{type(e).__name__}: {e}"}
        method = None
        free_memory()
        row["model"] = model
        rows.append(row)
        print(f"  {name:<40s} {time.perf_counter() - t0:6.1f} s   "
              f"peak above frozen {row.get('peak above frozen (MB)', math.nan):10.1f} MB   "
              f"step {row.get('median step (s)', math.nan):.3f} s (CPU {row.get('median step CPU (s)', math.nan):.3f} s)",
              flush=True)
    table = pd.DataFrame(rows)
    # On a CPU the ratio uses process CPU time: other processes on a shared machine
    # stretch wall-clock times unevenly between methods, but not the work a step does.
    timing = "median step CPU (s)" if device.type == "cpu" else "median step (s)"
    ref = table.loc[table.method.str.startswith("plain"), timing] if timing in table else []
    if len(ref):
        table.insert(table.columns.get_loc("median step CPU (s)") + 1, "x plain fwd+bwd",
                     table[timing] / float(ref.iloc[0]))
    return table


# ----------------------------------------------------------------- targets
def check_targets(table: pd.DataFrame, model="sd15") -> list[tuple[str, bool, str]]:
    """The SaRA claims on the SD1.5-sized UNet, as PASS/FAIL lines."""
    t = table[table.model == model].set_index("method")
    if "peak above frozen (MB)" not in t:
        return []
    peak, step = t["peak above frozen (MB)"], t.get("x plain fwd+bwd", pd.Series(dtype=float))
    results = []

    def find(prefix):
        hits = [m for m in t.index if m.startswith(prefix) and not pd.isna(peak.get(m))]
        return hits[0] if hits else None

    full, sel, plain = find("full"), find("selective"), find("plain")
    sara_nn, sara = find("SaRA 10% (no"), find("SaRA 10% +")
    for s in (sara, sara_nn):
        if s is None:
            continue
        if full:
            r = peak[s] / peak[full]
            results.append((f"{s}: peak above frozen <= 0.45x full FT", r <= 0.45, f"{r:.3f}x"))
        if sel:
            r = peak[s] / peak[sel]
            results.append((f"{s}: peak above frozen <= 0.70x selective", r <= 0.70, f"{r:.3f}x"))
        if plain and s in step:
            r = step[s] / step[plain]
            results.append((f"{s}: step time <= 1.15x plain fwd+bwd", r <= 1.15, f"{r:.3f}x"))
    if sara in step and sara_nn in step:
        r = step[sara] / step[sara_nn] - 1
        results.append(("nuclear-norm term adds <= 10% step time", r <= 0.10, f"{100 * r:+.1f}%"))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="course,sd15", help="comma-separated: course, sd15")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per method after the tracked ones (default: course 20, sd15 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: course model only, 3 timed steps")
    parser.add_argument("--methods", default=None,
                        help="only the methods whose name starts with one of these (comma-separated), "
                             "e.g. plain,sara,selective,full,lora")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/memory_time_<device>.csv)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    models = ["course"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    default_steps = {"course": 3 if args.quick else 20, "sd15": 3}
    torch.manual_seed(0)
    start = time.perf_counter()
    tables = []
    with tempfile.TemporaryDirectory() as folder:
        for model in models:
            steps = args.steps if args.steps is not None else default_steps.get(model, 3)
            only = [m.strip().lower() for m in args.methods.split(",")] if args.methods else None
            tables.append(benchmark_model(model, steps, device, Path(folder), only))
            free_memory()
    table = pd.concat(tables, ignore_index=True)
    cols = ["model"] + [c for c in table.columns if c != "model"]
    table = table[cols]
    suffix = "_quick" if args.quick else ""  # a smoke run never overwrites the real results
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"memory_time_{device.type}{suffix}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6g")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print("\n" + table.drop(columns=[c for c in ("frozen weights (MB)",) if c in table]).to_string(index=False))
    print(f"\nsaved {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    results = check_targets(table)
    if results:
        print("\nTargets (SD1.5-sized UNet):")
        for what, ok, value in results:
            print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value}")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s, CPU time {time.process_time():.0f} s, on {device}"
          f" ({torch.get_num_threads()} threads; CPU time ~ wall time on an otherwise idle machine)")
    return table


if __name__ == "__main__":
    main()
