"""CUDA graphs for SaRA's step (``SaRAAdamW(cuda_graphs=True)``): the update replayed with one launch.

Why: on a GPU at batch 1 the exact step is bound by kernel launches, not by
arithmetic. SD 1.5 has ~700 trained weights; per step torch's fused AdamW
prepares them in Python, then SaRA writes each weight's values back with one
kernel of its own. A CUDA graph records those kernels once and replays them
as a single launch, with no Python per weight.

What the graph holds (the exact step's kernels, on the same tensors, as the
eager step runs them)::

    step counters += 1                                  (torch._foreach_add_)
    AdamW per (param group, dtype)                      (torch._fused_adamw_, lr a device tensor)
    per weight: weight[positions] = values              (index_put_, as write_values on CUDA)

What stays outside, every step, as without graphs: gathering the selected
gradients (the hooks, in backward), the average over processes, clipping and
unscaling, the nuclear-norm term (a random weight each step, an SVD),
``nuclear_via="direct"`` and progressive adjustment.

A graph reads and writes fixed addresses, so:

* **gradients** — each captured weight's selected gradient lives in a fixed
  buffer, which the hook fills (``index_select(out=)``) instead of allocating.
  The cost: 4 bytes per trained entry kept from one step to the next (without
  graphs the gradients are freed at ``zero_grad``). A gradient that reaches
  ``step()`` in another tensor is copied into the buffer first.
* **the learning rate** — copied into a device tensor before each replay, so
  LR schedulers work. The kernel reads it as float32, as torch's capturable
  AdamW does: the numbers are the eager step's bit for bit when the lr is a
  float32 number (e.g. ``2**-9``), otherwise within float32's rounding of it.
* **when to capture again** — a graph is keyed by every address and size it
  touches and every hyperparameter baked into it (:func:`_key`). Whatever
  moves a tensor (progressive adjustment, ``load_state_dict``,
  ``reset_moments``) or changes which weights have a gradient this step gives
  another key, and the step captures again; the last :data:`GRAPH_CACHE`
  graphs are kept. A weight without optimizer state yet (its first step) or a
  param the optimizer does not own makes that step run eagerly.

``optimizer.graph_stats`` counts captures, replays and eager steps.
Tested on the CPU with a recording stand-in for the graph (``tests/sara``);
``tests/cuda`` compares real graphs with the eager step on a GPU, and
``benchmarks/step_phases.py`` (method ``sara-graphs``) measures whether it
pays: neither has run yet, as no GPU has been lent (``benchmarks/gpu_check.sh``).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .attach import flat_view

#: Graphs kept at once (keyed by what they touch); older ones are dropped with their memory pools.
GRAPH_CACHE = 2
#: Devices whose steps can be captured (the tests add "cpu" with a recording stand-in).
GRAPH_DEVICES = ("cuda",)


class _CudaGraph:
    """One ``torch.cuda.CUDAGraph``: ``capture()`` records (without running), ``replay()`` runs."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self):
        # thread_local: a data loader thread's CUDA calls during the capture are not an error
        return torch.cuda.graph(self.graph, capture_error_mode="thread_local")

    def replay(self) -> None:
        self.graph.replay()


def new_graph(device: torch.device):
    """The graph object for ``device`` (a module-level hook: the CPU tests put a recording stand-in here)."""
    return _CudaGraph()


def check_graph_option(cuda_graphs, *, own_step: bool, positions: str, fused: bool, devices) -> None:
    """``cuda_graphs=True`` captures the exact step on CUDA: refuse, naming the argument, what it cannot capture."""
    if not isinstance(cuda_graphs, bool):
        raise ConfigError(f"cuda_graphs must be True or False (capture the step as a CUDA graph), got {cuda_graphs!r}")
    if not cuda_graphs:
        return
    others = sorted({d.type for d in devices} - set(GRAPH_DEVICES))
    if others:
        raise ConfigError(f"cuda_graphs=True captures the step on a CUDA GPU, and this model's trained weights are "
                          f"on {', '.join(others)}: move the model to 'cuda' first, or use cuda_graphs=False")
    if len(set(devices)) > 1:
        raise ConfigError(f"cuda_graphs=True captures one device's step, and the trained weights are on "
                          f"{sorted(str(d) for d in set(devices))}: put the model on one GPU, or use cuda_graphs=False")
    if own_step:
        raise ConfigError("cuda_graphs=True captures the exact step (stock fused AdamW on a copy of the values): "
                          "it does not combine with compact=True, value_copy=False, moments other than 'fp32', "
                          "compiled=True or step_in_backward=True; drop those options or use cuda_graphs=False")
    if positions != "index":
        raise ConfigError(f"cuda_graphs=True writes the values back through plain int positions, got "
                          f"positions={positions!r}: use positions='index' (the default) or cuda_graphs=False")
    if not fused:
        raise ConfigError("cuda_graphs=True captures torch's fused AdamW kernel, and fused=False was given: "
                          "leave fused at its default (None) or use cuda_graphs=False")


@dataclass
class _Plan:
    """What one step's graph touches, grouped as the kernels take it."""

    steps: list = field(default_factory=list)
    # (lr tensor, param group, values, grads, exp_avgs, exp_avg_sqs, steps): one fused AdamW call each
    groups: list = field(default_factory=list)
    writes: list = field(default_factory=list)  # (flat weight, int positions, values)


class StepGraphs:
    """The captured steps of one :class:`~sara_edu.sara.SaRAAdamW` (see the module docstring)."""

    def __init__(self, slots, device: torch.device):
        self.device = device
        self.slot_of = {id(s.values): s for s in slots}  # the values tensors live as long as the optimizer
        self.graphs: OrderedDict = OrderedDict()
        self.lrs: list[torch.Tensor] = []  # one float32 device tensor per param group, never reallocated
        self.stats = {"captures": 0, "replays": 0, "eager": 0}

    def clear(self) -> None:
        """Drop every graph (and its memory pool); the next step captures again."""
        self.graphs.clear()

    def step(self, optimizer) -> bool:
        """AdamW and the write-back by replaying a graph (capturing it first if new); False: run it eagerly."""
        found = _key(optimizer, self.slot_of)
        if found is None:
            self.stats["eager"] += 1
            return False
        key, entries = found
        while len(self.lrs) < len(optimizer.param_groups):
            self.lrs.append(torch.zeros((), dtype=torch.float32, device=self.device))
        for lr, group in zip(self.lrs, optimizer.param_groups):
            lr.fill_(float(group["lr"]))  # outside the graph: the scheduler's lr of this step
        graph = self.graphs.get(key)
        if graph is None:
            graph, plan = new_graph(self.device), _plan(entries, optimizer.param_groups, self.lrs)
            with torch.no_grad(), graph.capture():
                _run(plan)
            self.graphs[key] = graph
            while len(self.graphs) > GRAPH_CACHE:
                self.graphs.popitem(last=False)
            self.stats["captures"] += 1
        else:
            self.graphs.move_to_end(key)
        graph.replay()
        self.stats["replays"] += 1
        return True


def _run(plan: _Plan) -> None:
    """The captured kernels: what ``torch.optim.AdamW(fused=True).step()`` and ``write_values`` launch."""
    torch._foreach_add_(plan.steps, 1)  # as torch's _fused_adam: the kernel does not count
    for lr, group, values, grads, exp_avgs, exp_avg_sqs, steps in plan.groups:
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(values, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False)
    for flat, codes, values in plan.writes:
        flat.index_put_((codes,), values)


def buffer_fits(buf: torch.Tensor | None, count: int, grad: torch.Tensor) -> bool:
    """Whether ``buf`` can hold the ``count`` selected entries of ``grad`` (the weight's gradient, or them)."""
    return buf is not None and buf.numel() == count and buf.dtype == grad.dtype and buf.device == grad.device


def _grad_buffer(slot) -> torch.Tensor:
    """The fixed tensor that holds ``slot``'s selected gradient for the graph, holding this step's gradient."""
    g, buf = slot.values.grad, slot.grad_buffer
    if g is buf:
        return buf
    if not buffer_fits(buf, g.numel(), g):
        # this step's gradient becomes the buffer when it is a tensor of its own; else a new one
        buf = g if g._base is None and g.is_contiguous() else torch.empty_like(g, memory_format=torch.contiguous_format)
        slot.grad_buffer = buf
    if g is not buf:
        buf.copy_(g)
    slot.values.grad = buf
    return buf


def _key(optimizer, slot_of: dict):
    """``(key, entries)`` of this step, or None when it must run eagerly (see the module docstring).

    The key holds every address and size the step's graph touches (the lr
    tensors aside: they are never reallocated) and every number baked into
    it; ``entries`` the (param group index, slot, values, state) of each
    weight with a gradient, whose gradient is then in its fixed buffer
    (:func:`_grad_buffer`). Built every step, so kept to the cheap calls.
    """
    key, entries = [], []
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("amsgrad") or group.get("maximize") or not group.get("fused"):
            return None
        key.append((gi, tuple(group["betas"]), group["eps"], group["weight_decay"]))
        for p in group["params"]:
            if p.grad is None:
                continue
            slot, state = slot_of.get(id(p)), optimizer.state.get(p)
            if slot is None or not state or "exp_avg" not in state:
                return None
            codes = slot.positions.codes
            key += (p.data_ptr(), p.numel(), _grad_buffer(slot).data_ptr(), state["exp_avg"].data_ptr(),
                    state["exp_avg_sq"].data_ptr(), state["step"].data_ptr(), slot.param.data_ptr(),
                    codes.data_ptr(), codes.numel())
            entries.append((gi, slot, p, state))
    if not entries:
        return None
    return tuple(key), entries


def _plan(entries, param_groups, lrs) -> _Plan:
    """The step's tensors grouped as its kernels take them: one fused AdamW call per (param group, dtype)."""
    plan, buckets = _Plan(), {}
    for gi, slot, p, state in entries:
        values, step = p.detach(), state["step"]
        bucket = buckets.setdefault((gi, p.dtype), ([], [], [], [], []))
        for tensors, t in zip(bucket, (values, slot.grad_buffer, state["exp_avg"], state["exp_avg_sq"], step)):
            tensors.append(t)
        plan.steps.append(step)
        plan.writes.append((flat_view(slot.param), slot.positions.codes, values))
    plan.groups = [(lrs[gi], param_groups[gi], *tensors) for (gi, _), tensors in buckets.items()]
    return plan
