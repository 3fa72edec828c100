"""SaRA under torch.distributed (gloo, CPU), launched by tests/sara/test_distributed.py.

``torchrun --standalone --nproc_per_node 2 ddp_sara.py OUT`` trains a tiny model
with SaRA (progressive adjustment that empties a weight, nuclear norm, gradient
accumulation, clipping through ``model.parameters()``, zeroing through the
optimizer and through the model), each rank on its half of every global batch:
once wrapped in DistributedDataParallel (accumulating in ``ddp.no_sync()``),
once bare (``optimizer.no_sync()``), once resumed mid-run from
``state_dict``, and once with tied weights. It also records the errors of
misuse: attaching after wrapping, DDP on a parent of SaRA's module, and an
Accelerate that runs each process as ``DistributedType.NO``. Without torchrun the same script is the one-process reference
on the whole batch. Writes ``OUT/{rank{r}|single}.safetensors`` (weights after
every step) and a JSON of facts.
"""
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sara_edu.sara import SaRAAdamW

GLOBAL_BATCH, ACCUMULATION, STEPS, PROGRESSIVE, MAX_NORM = 8, 2, 6, 3, 0.05
# SARA_EDU_GRAPH_STAND_IN=1: the same training with cuda_graphs=True, the CUDA graph replaced by the CPU stand-in
# of tests/sara/test_cuda_graph.py (the misuse checks are skipped)
GRAPHS = os.environ.get("SARA_EDU_GRAPH_STAND_IN") == "1"
if GRAPHS:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from test_cuda_graph import RecordedGraph

    from sara_edu.sara import cuda_graph

    cuda_graph.GRAPH_DEVICES = ("cuda", "cpu")
    cuda_graph.new_graph = lambda device: RecordedGraph()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)  # its zero bias is all selected and all freezes at adjustment
        self.lin1 = nn.Linear(8 * 36, 32)
        self.lin2 = nn.Linear(32, 5)

    def forward(self, x):
        h = self.norm(torch.nn.functional.silu(self.conv(x)))
        return self.lin2(torch.nn.functional.silu(self.lin1(h.flatten(1))))


def build():
    torch.manual_seed(0)
    model = Tiny()
    opt = SaRAAdamW(model, lr=3e-2, fraction=0.3, rank_lambda=0.05, progressive_iter=PROGRESSIVE,
                    weight_decay=0.1, seed=3, cuda_graphs=GRAPHS)
    return model, opt


def batch(step, micro, rank, world):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x, y = torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)
    share = GLOBAL_BATCH // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train(model, opt, steps, rank, world, record=None, norms=None, prefix="", net=None):
    """``net``: what the forward runs through (a DDP wrapper, or the model itself)."""
    net = net or model
    accumulate = net.no_sync if hasattr(net, "no_sync") else opt.no_sync
    for step in steps:
        for micro in range(ACCUMULATION):
            x, y = batch(step, micro, rank, world)
            with accumulate() if micro < ACCUMULATION - 1 else contextlib.nullcontext():
                loss = nn.functional.mse_loss(net(x), y) / ACCUMULATION
                loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        (opt.zero_grad if step % 2 == 0 else model.zero_grad)()
        if record is not None:
            record[f"{prefix}step{step}"] = flat(model)
            norms.append(float(norm))


def _error_of(run) -> str:
    try:
        run()
        return "no error"
    except Exception as e:  # noqa: BLE001 (recorded for the test)
        return f"{type(e).__name__}: {e}"


def clip_inside_no_sync(world):
    """A norm of gradients not yet averaged across processes must refuse (each rank would clip differently)."""
    if world == 1:
        return "single process"
    model, opt = build()
    x, y = batch(0, 0, dist.get_rank(), world)
    with opt.no_sync():
        nn.functional.mse_loss(model(x), y).backward()
    return _error_of(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))


def different_weights(world):
    """Ranks that attach to different weights must refuse at the first synchronisation, on every rank."""
    if world == 1:
        return "single process"
    model, _opt = build()  # attached (and kept alive) for the first synchronisation
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.norm.weight.add_(1e-3)  # a frozen weight: the selection is the same, the model is not
    x, y = batch(0, 0, dist.get_rank(), world)
    return _error_of(lambda: nn.functional.mse_loss(model(x), y).backward())


def attach_after_wrapping(world):
    """SaRAAdamW on a model already inside DDP must refuse (its reducer would hold dense buckets)."""
    if world == 1:
        return "single process"
    torch.manual_seed(0)
    return _error_of(lambda: SaRAAdamW(DDP(Tiny()), lr=1e-2, fraction=0.3))


def wrapped_before_attaching(world):
    """DDP built on the bare model, then SaRA attached to it: DDP's buckets hold SaRA's weights."""
    if world == 1:
        return "single process"
    torch.manual_seed(0)
    model = Tiny()
    ddp = DDP(model)
    _opt = SaRAAdamW(model, lr=1e-2, fraction=0.3)
    x, y = batch(0, 0, dist.get_rank(), world)
    return _error_of(lambda: nn.functional.mse_loss(ddp(x), y).backward())


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Tiny()
        self.head = nn.Linear(5, 5)

    def forward(self, x):
        return self.head(self.inner(x))


def sara_on_a_submodule(world):
    """SaRA attached to a submodule, DDP wrapping its parent: DDP reads the ignore list of the parent only."""
    if world == 1:
        return "single process"
    torch.manual_seed(0)
    parent = Parent()
    _opt = SaRAAdamW(parent.inner, lr=1e-2, fraction=0.3)
    ddp = DDP(parent)
    x, y = batch(0, 0, dist.get_rank(), world)
    return _error_of(lambda: nn.functional.mse_loss(ddp(x), y).backward())


class Tied(nn.Module):
    """Tiny with a tied pair of matrices: one Parameter under two names."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)  # weight 1: nothing selected, so DDP has an anchor to build on
        self.lin1 = nn.Linear(8 * 36, 32)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight
        self.lin2 = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.nn.functional.silu(self.lin1(self.norm(torch.nn.functional.silu(self.conv(x))).flatten(1)))
        return self.lin2(self.b(torch.nn.functional.silu(self.a(h))))


def tied_weights(world, rank, record):
    """Tied weights with SaRA, then DDP: trains, and 2 processes equal 1 (every alias is on DDP's ignore list)."""
    torch.manual_seed(0)
    model = Tied()
    opt = SaRAAdamW(model, lr=3e-2, fraction=0.3, seed=3)
    record["tied/initial"] = flat(model)
    record["tied/selected_in_a"] = torch.tensor(sum(s.count for s in opt.slots if s.name == "a.weight"))
    net = DDP(model) if world > 1 else model
    train(model, opt, range(3), rank, world, net=net)
    record["tied/final"] = flat(model)
    return [n for n in getattr(net, "parameters_to_ignore", ())]


def accelerate_not_distributed(world):
    """Accelerate without GPUs and without ACCELERATE_USE_CPU: each of the processes is DistributedType.NO."""
    if world == 1:
        return "single process", None
    from accelerate import Accelerator

    os.environ.pop("ACCELERATE_USE_CPU", None)
    accelerator = Accelerator()
    kind = str(accelerator.distributed_type)
    torch.manual_seed(0)
    return _error_of(lambda: SaRAAdamW(Tiny(), lr=1e-2, fraction=0.3)), kind


def main(out_dir):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    record, facts = {}, {"world": world}

    for variant in ("ddp", "bare") if world > 1 else ("bare",):
        model, opt = build()
        net = DDP(model) if variant == "ddp" else model
        if variant == "ddp":  # what DDP's reducer holds: the anchor only, never SaRA's weights
            facts["ddp_reducer_numel"] = sum(p.numel() for n, p in model.named_parameters()
                                             if p.requires_grad and n not in net.parameters_to_ignore)
        norms = []
        train(model, opt, range(STEPS), rank, world, record, norms, prefix=f"{variant}/", net=net)
        facts[variant] = {
            "norms": norms, "churn": opt.churn.to_dict("records"),
            "emptied_weights": [s.name for s in opt.slots if s.idx.numel() == 0 and s.frozen],
            "bytes_communicated": opt.sync.bytes_communicated, "collectives": opt.sync.collectives,
            "bytes_per_sync_now": opt.sync.bytes_per_sync(), "selected": opt.selection.total_selected,
            "trainable_now": opt.num_trainable, "graph_stats": opt.graph_stats,
            "dense_grads": [n for n, p in model.named_parameters()
                            if p.grad is not None and type(p.grad) is torch.Tensor]}

    # resume: 3 steps, save (rank 0), fresh model and optimizer on every rank, load, 3 more steps
    ckpt = os.path.join(out_dir, f"resume{world}.pt")
    model, opt = build()
    train(model, opt, range(PROGRESSIVE), rank, world)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, ckpt)
    if world > 1:
        dist.barrier()
    model, opt = build()
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    train(model, opt, range(PROGRESSIVE, STEPS), rank, world, net=DDP(model) if world > 1 else None)
    record["resume/final"] = flat(model)
    facts["resume_graph_stats"] = opt.graph_stats

    if not GRAPHS:
        facts["attach_after_wrapping"] = attach_after_wrapping(world)
        facts["clip_inside_no_sync"] = clip_inside_no_sync(world)
        facts["different_weights"] = different_weights(world)
        facts["wrapped_before_attaching"] = wrapped_before_attaching(world)
        facts["sara_on_a_submodule"] = sara_on_a_submodule(world)
        facts["tied_ignored"] = tied_weights(world, rank, record)
        facts["accelerate_not_distributed"], facts["accelerate_type"] = accelerate_not_distributed(world)
    name = f"rank{rank}" if world > 1 else "single"
    save_file(record, os.path.join(out_dir, f"{name}.safetensors"))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(facts, f, default=str)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
