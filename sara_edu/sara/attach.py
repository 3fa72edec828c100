"""Attaching an optimizer to a model, and leaving it a plain model again.

SaRA and the selective baseline train a model's weights in place, through
hooks. This module keeps the bookkeeping that makes that safe: which optimizer
owns a model (a weak reference on each managed parameter, so a deleted
optimizer never pins the model), refusing to attach twice or on top of LoRA
adapters, and :func:`detach` (alias :func:`merge`), which removes hooks and
marks and restores the ``requires_grad`` flags: the model keeps its trained
weights and becomes a plain ``nn.Module``.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import ConfigError

_OWNER_ATTR = "_sara_edu_owner"  # on each managed Parameter: weakref to the optimizer that owns it
MODULE_FLAG = "sara_edu_attached"  # on the module, for people: which method is attached


def attached_owner(model: nn.Module):
    """The live SaRA/selective optimizer attached to ``model`` (or one of its params), else None."""
    for p in model.parameters():
        ref = getattr(p, _OWNER_ATTR, None)
        owner = ref() if ref is not None else None
        if owner is not None and not owner.detached:
            return owner
    return None


def check_is_model(model, what: str) -> None:
    """SaRA attaches to the model it trains (e.g. ``pipe.unet``), not to a pipeline or a parameter list."""
    if isinstance(model, nn.Module):
        return
    if hasattr(model, "unet") or hasattr(model, "transformer"):
        part = "unet" if hasattr(model, "unet") else "transformer"
        raise ConfigError(f"{what} takes the model to train, not the whole {type(model).__name__}: "
                          f"use {what}(pipe.{part}, ...)")
    if isinstance(model, torch.Tensor) or hasattr(model, "__iter__") or hasattr(model, "__next__"):
        raise ConfigError(f"{what} takes the model itself (e.g. pipe.unet), not its parameters "
                          f"(got {type(model).__name__}): use {what}(unet, ...) instead of "
                          f"{what}(unet.parameters(), ...); target_modules/layer_types choose the weights")
    raise ConfigError(f"{what} takes a torch.nn.Module to train (e.g. pipe.unet), got {type(model).__name__}")


def check_attachable(model: nn.Module, what: str) -> None:
    """Refuse to attach twice, or on top of LoRA adapters (never silent double training)."""
    owner = attached_owner(model)
    if owner is not None:
        raise ConfigError(
            f"{type(owner).__name__} is already attached to this model: attaching {what} again would train the "
            "same weights twice. Call sara_edu.sara.detach(model) first (it keeps the trained weights), "
            "or start from a fresh copy of the base model.")
    peft_config = getattr(model, "peft_config", None)
    lora = next((n for n, _ in model.named_parameters() if "lora_" in n), None)
    if peft_config or lora is not None:
        raise ConfigError(
            f"this model carries LoRA adapters ({lora or 'peft_config'}); {what} trains the base weights and "
            "would train under (and alongside) the adapters. Merge and remove the LoRA first "
            "(PEFT: model = model.merge_and_unload(); diffusers: unet.fuse_lora(); unet.unload_lora()), "
            "or start from a fresh copy of the base model.")


def mark_attached(model: nn.Module, params, owner) -> None:
    ref = weakref.ref(owner)
    for p in params:
        setattr(p, _OWNER_ATTR, ref)
    model.__dict__[MODULE_FLAG] = type(owner).__name__


def unmark_attached(model: nn.Module | None, params) -> None:
    for p in params:
        if hasattr(p, _OWNER_ATTR):
            delattr(p, _OWNER_ATTR)
    if model is not None:
        model.__dict__.pop(MODULE_FLAG, None)


def flat_view(p: torch.Tensor) -> torch.Tensor:
    """A flat *view* of a weight (row-major positions), so writes land in the weight."""
    if not p.is_contiguous():
        raise ConfigError("SaRA needs contiguous weights (flat positions are row-major); "
                          "call model.to(memory_format=torch.contiguous_format) before attaching")
    return p.detach().view(-1)


def release_model(optimizer, params, requires_grad: bool | None) -> nn.Module | None:
    """The shared end of ``detach`` for SaRA and the selective baseline.

    Clears the optimizer state, removes the marks from ``params`` and restores
    (``requires_grad=None``) or sets the parameters' ``requires_grad`` flags.
    """
    model = optimizer._model_ref()
    optimizer.state.clear()
    unmark_attached(model, params)
    if model is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(optimizer._requires_grad_before.get(name, True) if requires_grad is None
                             else bool(requires_grad))
    optimizer.detached = True
    return model


def attached_model(optimizer) -> nn.Module:
    """The live model an optimizer was attached to, or a clear error."""
    model = optimizer._model_ref()
    if model is None:
        raise ConfigError("the model this optimizer was attached to no longer exists")
    return model


def optimizer_of(obj):
    """The optimizer behind a method object, an optimizer, or a model with one attached."""
    if isinstance(obj, nn.Module):
        owner = attached_owner(obj)
        if owner is None:
            raise ConfigError("no SaRA/selective optimizer is attached to this model")
        return owner
    if hasattr(obj, "trained_entries") and hasattr(obj, "detached"):
        return obj
    # a method object of the training loop (SaRA, SelectiveFineTuning) holds its optimizer once attached;
    # duck-typed so that the method package does not import the loop's classes
    if hasattr(obj, "build_optimizer") and hasattr(obj, "optimizer"):
        if obj.optimizer is None:
            raise ConfigError(f"{type(obj).__name__} has not been attached yet: train with it first")
        return obj.optimizer
    raise ConfigError(f"expected a SaRAAdamW, a SaRA/SelectiveFineTuning method or a model, got {type(obj).__name__}")


def detach(obj, requires_grad: bool | None = None) -> nn.Module | None:
    """Remove SaRA (or the selective baseline) from a model: hooks, marks, frozen flags.

    ``obj``: the model, the optimizer or the method object. SaRA trains the
    weights in place, so the model keeps its trained values and becomes a plain
    ``nn.Module`` with the same outputs. A model with nothing attached is left
    as is (stale marks, e.g. on a deep copy, are cleared).
    """
    if isinstance(obj, nn.Module) and attached_owner(obj) is None:
        unmark_attached(obj, list(obj.parameters()))
        if requires_grad is not None:
            obj.requires_grad_(bool(requires_grad))
        return obj
    return optimizer_of(obj).detach(requires_grad)


def merge(obj, requires_grad: bool | None = None) -> nn.Module | None:
    """Same as :func:`detach`: SaRA's trained values already live in the weights."""
    return detach(obj, requires_grad)
