"""The per-layer mode (``SaRAAdamW(step_in_backward=True)``): each weight is updated inside the backward pass.

By default a weight's selected gradient (4 bytes per trained entry, 344 MB
on SD 1.5) waits from the moment backward produces it until ``step()``. Here
the weight's gradient hook runs the whole update at once: it reads the dense
gradient at the trained positions, adds the nuclear-norm term if this step's
term fell on this weight, runs AdamW and writes the weight, then drops the
dense gradient. No selected gradient is ever held. The numbers are the
default step's, bit for bit: the same kernels, one weight at a time (the
stock exact step is per weight too), and the term's weight drawn from the
same random sequence at the same step.

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
from .compact_step import step_weight
from .grad import STEP_IN_BACKWARD_ONCE, StepTakenGrad


def hook_step(optimizer, slot) -> None:
    """Register the hook that updates ``slot``'s weight as soon as its dense gradient exists."""
    ref = weakref.ref(optimizer)  # the hook must not hold the optimizer (a deleted optimizer frees its state)

    def update(p, slot=slot):
        opt = ref()
        if opt is not None:
            _update(opt, slot, p)

    slot.param.requires_grad_(True)
    slot.handle = slot.param.register_post_accumulate_grad_hook(update)


@torch.no_grad()
def _update(optimizer, slot, p) -> None:
    if isinstance(p.grad, StepTakenGrad) or slot.stepped == optimizer.steps_done:
        raise ConfigError(STEP_IN_BACKWARD_ONCE)
    dense = p.grad.reshape(-1)
    p.grad = StepTakenGrad(p.shape, slot.grad_positions, slot.values.detach()[:0], slot.name)
    slot.values.grad = StepTakenGrad(slot.values.shape, None, slot.values.detach()[:0], slot.name)
    slot.stepped = optimizer.steps_done
    optimizer._follow_weights([slot])
    nuclear = _nuclear_for(optimizer, slot)
    if nuclear is not None and optimizer.nuclear_via == "adam":  # the term joins the gradient before AdamW
        step_weight(optimizer, slot, dense.index_select(0, slot.idx).add_(nuclear.to(dense.dtype)),
                    optimizer._group_of(slot))
    else:
        step_weight(optimizer, slot, dense, optimizer._group_of(slot), dense_grad=True)
    if nuclear is not None and optimizer.nuclear_via == "direct":
        optimizer._step_nuclear_directly(slot, nuclear)
    optimizer._note_versions([slot])


def _nuclear_for(optimizer, slot) -> torch.Tensor | None:
    """λ·UVᵀ[M] if this step's nuclear-norm term fell on ``slot`` (drawn once per step, at the first weight's
    update, from the same random sequence as the default step draws it)."""
    if optimizer._nuclear_pick is None:
        optimizer._nuclear_pick = [None, False]
        if optimizer.rank_lambda > 0 and optimizer.steps_done % optimizer.nuclear_every == 0:
            eligible = optimizer.eligible_for_nuclear()
            if eligible:
                optimizer._nuclear_pick[0] = optimizer._rng.choice(eligible)
    if optimizer._nuclear_pick[0] is not slot:
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
