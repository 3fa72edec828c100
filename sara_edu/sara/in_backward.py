"""The per-layer mode (``SaRAAdamW(step_in_backward=True)``): each weight is updated inside the backward pass.

By default a weight's selected gradient (4 bytes per trained entry, 344 MB
on SD 1.5) waits from the moment backward produces it until ``step()``. Here
the weight's gradient hook runs the whole update at once: it reads the dense
gradient at the trained positions, adds the nuclear-norm term if this step's
term fell on this weight, runs AdamW and writes the weight, then drops the
dense gradient. No selected gradient is ever held. A large Linear/Conv2d
weight does not even get a whole dense gradient: :mod:`.row_grad` makes it a
block of rows at a time, and each block is read at its trained entries
before the next is made. The entries reach AdamW in pieces of
``compact_step.PIECE_ENTRIES``, so the kernels see the same slices as in
the default step. The numbers are the default step's, bit for bit where the
weight's gradient comes whole (the same kernels, one weight at a time, as the
stock exact step; the term's weight drawn from the same random sequence at
the same step); a gradient made in blocks of rows is the same sums from a
matmul or convolution of another shape, which can round otherwise in the last
bits (1.7e-6 of the training's movement after six steps of the small test
UNet, every layer in blocks; tested).

What needs every gradient before any update cannot work this way, and is
refused with a :class:`~sara_edu.errors.ConfigError` (the weight's ``.grad``
becomes a :class:`~sara_edu.sara.grad.StepTakenGrad`): global gradient
clipping, ``GradScaler`` (it unscales after backward), gradient accumulation
(a second gradient before ``step()``) and several processes (the gradient
must be averaged first). ``step()`` finishes the step: the term's weight if
no gradient reached it (then the term alone moves it, as in the default
step), the step count, progressive adjustment.

Why it is safe to write a weight inside backward: its hook runs after every
use of the weight in this backward pass has produced its gradient (and,
with gradient checkpointing, after the recomputation that used it).
"""
from __future__ import annotations

import weakref

import torch

from ..errors import ConfigError
from . import compact_step, row_grad
from .compact_step import positions_between, step_pieces, step_weight
from .grad import STEP_IN_BACKWARD_ONCE, StepTakenGrad
from .positions import entry_bounds


ROUTED_TWICE = ("a second gradient arrived for {name!r} in one step. " + STEP_IN_BACKWARD_ONCE + ". A layer called "
                "twice in one forward pass sends two as well: this large weight's gradient is made in blocks of rows "
                "inside the layer's backward (sara_edu.sara.row_grad), once per call; set "
                "sara_edu.sara.row_grad.ROW_BLOCK_BYTES = float('inf') before attaching to take every weight's "
                "gradient whole instead")


def hook_step(optimizer, slot):
    """Update ``slot``'s weight as soon as its dense gradient exists; returns the handle that undoes it.

    A large Linear/Conv2d weight has its gradient made a block of rows at a time instead (:mod:`.row_grad`); its
    hook stays, so that a gradient arriving by another way is refused (updated once per step) rather than lost.
    """
    ref = weakref.ref(optimizer)  # the hook must not hold the optimizer (a deleted optimizer frees its state)

    def update(p, slot=slot):
        opt = ref()
        # autograd runs this hook even when no gradient reached the weight: as for a routed weight, whose
        # gradient went to update_from_rows (a gradient arriving on top of that one raises in StepTakenGrad.add_)
        if opt is not None and p.grad is not None and not isinstance(p.grad, StepTakenGrad):
            _update(opt, slot, p, _dense_blocks(p.grad.reshape(-1)))

    def update_from_rows(blocks, slot=slot):  # blocks=None: only check that the weight was not updated yet
        opt = ref()
        if opt is not None:
            if slot.stepped == opt.steps_done:
                raise ConfigError(ROUTED_TWICE.format(name=slot.name))
            if blocks is not None:
                _update(opt, slot, slot.param, blocks)
        return opt is not None

    slot.param.requires_grad_(True)
    handles = [slot.param.register_post_accumulate_grad_hook(update)]
    layer = _layer_of(optimizer, slot)
    if layer is not None and row_grad.routable(layer, slot.param):
        handles.append(row_grad.Route(layer, update_from_rows))
    return _Handles(handles)


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _layer_of(optimizer, slot):
    module_name, _, attribute = slot.name.rpartition(".")
    model = optimizer._model_ref()
    if attribute != "weight" or model is None:
        return None
    try:
        return model.get_submodule(module_name)
    except AttributeError:
        return None


def _dense_blocks(dense: torch.Tensor):
    """The hook's dense gradient as blocks of ROW_BLOCK_BYTES (views: it exists already; only the reads are split)."""
    size = max(1, int(min(row_grad.ROW_BLOCK_BYTES, dense.numel() * dense.element_size()) // dense.element_size()))
    for first in range(0, dense.numel(), size):
        yield first, min(size, dense.numel() - first), lambda first=first: dense[first:first + size]


@torch.no_grad()
def _update(optimizer, slot, p, blocks) -> None:
    """Update ``slot``'s weight from ``blocks``, (first position, count, () -> dense gradient there), in order."""
    if isinstance(p.grad, StepTakenGrad) or slot.stepped == optimizer.steps_done:
        raise ConfigError(STEP_IN_BACKWARD_ONCE)
    p.grad = StepTakenGrad(p.shape, slot.grad_positions, slot.values.detach()[:0], slot.name)
    slot.values.grad = StepTakenGrad(slot.values.shape, None, slot.values.detach()[:0], slot.name)
    slot.stepped = optimizer.steps_done
    optimizer._follow_weights([slot])
    nuclear = _nuclear_for(optimizer, slot)
    joins = nuclear if optimizer.nuclear_via == "adam" else None  # the term joins the gradient before AdamW
    step_pieces(optimizer, slot, optimizer._group_of(slot), _selected_pieces(slot, blocks, joins))
    if nuclear is not None and optimizer.nuclear_via == "direct":
        optimizer._step_nuclear_directly(slot, nuclear)
    optimizer._note_versions([slot])


def _selected_pieces(slot, blocks, nuclear):
    """The selected gradient as step_pieces takes it, read from each block of the dense gradient while it exists:
    pieces of PIECE_ENTRIES entries (the last one shorter), whichever blocks their entries come from."""
    positions, total = positions_between(slot.positions), slot.count
    sorted_positions = slot.positions.codes if slot.positions.kind == "index" else positions(0, total)
    blocks = list(blocks)  # (the gradients are made later, when called)
    # every block's range of entries in one search: on a GPU, one wait for the device per weight, not per block
    edges = entry_bounds(sorted_positions, [first for first, _, _ in blocks] + [blocks[-1][0] + blocks[-1][1]]
                         if blocks else [0])
    done, pending = 0, []
    for (first, count, dense), start, stop in zip(blocks, edges, edges[1:]):
        if start == stop:  # no trained entry in these rows: their gradient is never made
            continue
        selected = dense().index_select(0, positions(start, stop) - first)
        if nuclear is not None:
            selected.add_(nuclear[start:stop].to(selected.dtype))
        pending.append(selected)
        ready = stop - done if stop == total else (stop - done) - (stop - done) % compact_step.PIECE_ENTRIES
        if ready:
            joined = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield done, joined[:ready]
            pending, done = [joined[ready:]], done + ready
        if done == total:
            return


def _nuclear_for(optimizer, slot) -> torch.Tensor | None:
    """λ·UVᵀ[M] if this step's nuclear-norm term fell on ``slot`` (drawn once per step, at the first weight's
    update, from the same random sequence as the default step draws it)."""
    if optimizer._nuclear_pick is None:
        optimizer._nuclear_pick = [None, False]
        if optimizer.rank_lambda > 0 and optimizer.steps_done % optimizer.nuclear_every == 0:
            eligible = optimizer.eligible_for_nuclear()
            if eligible:
                optimizer._nuclear_pick[0] = optimizer._rng.choice(eligible)
    if slot is None or optimizer._nuclear_pick[0] is not slot:  # None: finish_step only makes sure of the draw
        return None
    optimizer._nuclear_pick[1] = True
    return optimizer._nuclear_grad(slot)


@torch.no_grad()
def finish_step(optimizer) -> None:
    """What is left of ``step()`` once backward has updated the weights."""
    if any(s.values.grad is not None and not isinstance(s.values.grad, StepTakenGrad) for s in optimizer.slots):
        raise ConfigError("with step_in_backward=True the gradients are applied inside backward(): a gradient "
                          "set on the optimizer's values by hand is not used. Leave them alone, or use the "
                          "default step_in_backward=False")
    _nuclear_for(optimizer, None)  # draws the term's weight if no backward pass did (as the default step would)
    slot, done = optimizer._nuclear_pick
    if slot is not None and not done:  # the term's weight had no loss gradient: the term alone moves it
        optimizer._follow_weights([slot])
        nuclear = optimizer._nuclear_grad(slot)
        if optimizer.nuclear_via == "adam":
            step_weight(optimizer, slot, nuclear, optimizer._group_of(slot))
        else:
            optimizer._step_nuclear_directly(slot, nuclear)
        optimizer._note_versions([slot])
    optimizer._nuclear_pick = None
    optimizer._count_step()
