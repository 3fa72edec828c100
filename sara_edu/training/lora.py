"""LoRA, the baseline SaRA is compared with, done the way diffusers users do it.

LoRA (Hu et al., 2021) freezes a weight ``W`` (out x in) and learns a low-rank
change ``ΔW = (alpha / r) · B A`` with ``A`` (r x in) and ``B`` (out x r): for
each targeted layer it trains ``r · (in + out)`` numbers. We do not reimplement
it: :class:`LoRA` calls ``unet.add_adapter(peft.LoraConfig(...))`` exactly as the
diffusers training scripts do, so what the course measures is what people use.

* :func:`lora_rank_matching` picks the rank whose LoRA trains about as many
  numbers as another method (SaRA) for a like-for-like comparison;
* :func:`save_lora` / :func:`load_lora` store only the adapter (safetensors);
* :func:`merge_lora` folds ``ΔW`` into ``W`` and removes the adapter: a plain
  model again, with the same outputs.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import load_tensors, save_tensors
from .method import TrainingMethod

# The attention projections: the diffusers/peft default for text-to-image LoRA.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Widening ladder for rank matching: if even the largest sensible rank on the
# attention projections trains fewer numbers than asked for, LoRA also goes on
# the transformer blocks' other layers, then on the ResNet convolutions.
TRANSFORMER_TARGETS = ATTENTION_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
ALL_TARGETS = TRANSFORMER_TARGETS + ("conv1", "conv2", "time_emb_proj")
TARGET_LADDER = (ATTENTION_TARGETS, TRANSFORMER_TARGETS, ALL_TARGETS)
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d)


# ----------------------------------------------------------------- targets
def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the full module name or its dotted suffix."""
    return name == target or name.endswith("." + target)


def targeted_modules(unet: nn.Module, target_modules=ATTENTION_TARGETS, strict: bool = True) -> dict[str, nn.Module]:
    """The layers LoRA would wrap, by name (Linear and Conv2d layers whose name matches).

    With ``strict`` every target must match at least one layer, else a
    :class:`ConfigError` lists names that would work.
    """
    targets = _as_targets(target_modules)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, _LORA_LAYER_TYPES)}
    found = {n: m for n, m in layers.items() if any(_matches(n, t) for t in targets)}
    unknown = [t for t in targets if not any(_matches(n, t) for n in layers)]
    if (strict and unknown) or not found:
        raise ConfigError(f"LoRA target module(s) {unknown or list(targets)} match no Linear/Conv2d layer of this "
                          f"model. Valid names include: {', '.join(_short_names(layers)[:12])}")
    return found


def _as_targets(target_modules) -> tuple[str, ...]:
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules or ())
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"target_modules must be a non-empty list of layer names such as "
                          f"{list(ATTENTION_TARGETS)}, got {target_modules!r}")
    return targets


def _short_names(layers) -> list[str]:
    """Distinct layer names without their block path: 'to_q', 'to_out.0', 'ff.net.2', 'conv1', ..."""
    block = r"(?:attn\d+|transformer_blocks\.\d+|resnets\.\d+|attentions\.\d+|samplers\.\d+|time_embedding)"
    names = []
    for n in layers:
        short = re.sub(rf"^.*{block}\.", "", n)
        if short not in names:
            names.append(short)
    return names


# ------------------------------------------------------------- counting
def lora_parameters_per_rank(unet: nn.Module, target_modules=ATTENTION_TARGETS) -> int:
    """How many numbers LoRA trains per unit of rank on these targets.

    Linear(in, out): ``A`` is r x in, ``B`` is out x r, so ``r · (in + out)``.
    Conv2d(in, out, k x k): peft's ``A`` is a k x k conv in -> r and ``B`` a 1x1
    conv r -> out, so ``r · (in·k·k + out)``. The total is linear in the rank.
    """
    return sum(_fan_in(m) + _fan_out(m) for m in targeted_modules(unet, target_modules).values())


def _fan_in(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
    return m.in_features


def _fan_out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def max_useful_rank(unet: nn.Module, target_modules=ATTENTION_TARGETS) -> int:
    """Above ``min(in, out)`` of its smallest targeted layer, ``B A`` can't gain rank: it is no longer low-rank."""
    return min(min(_fan_in(m), _fan_out(m)) for m in targeted_modules(unet, target_modules).values())


class LoRARankMatch(NamedTuple):
    """The outcome of :func:`lora_rank_matching`."""

    rank: int
    target_modules: tuple[str, ...]
    lora_parameters: int  # what LoRA at this rank on these targets trains
    widened: bool  # True if the targets had to be widened to reach the count


def lora_rank_matching(unet: nn.Module, n_params: int, target_modules=ATTENTION_TARGETS,
                       widen: bool = True) -> LoRARankMatch:
    """The LoRA rank whose trainable count is closest to ``n_params`` (e.g. SaRA's).

    The count is ``rank · lora_parameters_per_rank``, so the closest rank is
    ``round(n_params / per_rank)``. If that exceeds :func:`max_useful_rank` of the
    targets (LoRA on the attention projections alone cannot train as many
    numbers as SaRA's 10% of an SD1.5 UNet), and ``widen`` is true, the targets
    grow along :data:`TARGET_LADDER` (+ proj_in/proj_out/feed-forward, then
    + ResNet convolutions) until a useful rank reaches the count; failing that
    the largest useful rank on the widest targets is returned.
    """
    if not isinstance(n_params, numbers.Integral) or isinstance(n_params, bool) or n_params < 1:
        raise ConfigError(f"n_params must be a positive integer (a number of trainable parameters), got {n_params!r}")
    n_params = int(n_params)
    _check_no_adapter(unet)
    targets = _as_targets(target_modules)
    candidates = [targets]
    if widen:
        candidates += [t for t in TARGET_LADDER if set(t) > set(targets)]
    best = None
    for i, cand in enumerate(candidates):
        cand = tuple(t for t in cand if t in targets or _present(unet, t))
        per_rank = lora_parameters_per_rank(unet, cand)
        rank = min(max(1, round(n_params / per_rank)), max_useful_rank(unet, cand))
        best = LoRARankMatch(rank, cand, rank * per_rank, widened=i > 0)
        if round(n_params / per_rank) <= rank:  # reached without capping
            break
    return best


def _present(unet, target) -> bool:
    return any(_matches(n, target) for n, m in unet.named_modules() if isinstance(m, _LORA_LAYER_TYPES))


# ----------------------------------------------------------------- method
@dataclass
class LoRA(TrainingMethod):
    """Train a low-rank adapter on ``target_modules``; the UNet itself stays frozen.

    ``alpha`` defaults to ``rank`` (scale 1), the diffusers training scripts'
    choice. ``B`` starts at zero, so training starts from the pretrained model.
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: tuple[str, ...] = ATTENTION_TARGETS
    dropout: float = 0.0
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive (or None for alpha = rank), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.target_modules = _as_targets(self.target_modules)
        self.name = self.name or f"lora r={self.rank}"

    @classmethod
    def matched_to(cls, unet: nn.Module, n_params: int, **kwargs) -> "LoRA":
        """A LoRA training about ``n_params`` numbers on ``unet`` (see :func:`lora_rank_matching`)."""
        match = lora_rank_matching(unet, n_params)
        return cls(rank=match.rank, target_modules=match.target_modules, **kwargs)

    def config(self):
        """The ``peft.LoraConfig`` for this method."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, lora_dropout=self.dropout,
                          init_lora_weights="gaussian", target_modules=list(self.target_modules))

    def build_optimizer(self, unet, *, lr, weight_decay, total_steps, betas=(0.9, 0.999)):
        _check_no_adapter(unet)
        targeted_modules(unet, self.target_modules)  # clear error for a typo before peft's
        if not hasattr(unet, "add_adapter"):
            raise ConfigError(f"LoRA needs a diffusers model (with add_adapter), got {type(unet).__name__}")
        unet.requires_grad_(False)
        unet.add_adapter(self.config())
        params = [p for n, p in unet.named_parameters() if p.requires_grad and "lora_" in n]
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)

    def trainable_parameters(self, unet: nn.Module) -> int:
        return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad)


def has_lora(unet: nn.Module) -> bool:
    """Does ``unet`` carry a peft adapter?"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def _check_no_adapter(unet: nn.Module) -> None:
    from ..sara.attach import MODULE_FLAG, attached_owner

    owner = attached_owner(unet)
    if owner is not None or getattr(unet, "_sara_attached", False) or MODULE_FLAG in vars(unet):
        what = type(owner).__name__ if owner is not None else "SaRA"
        raise ConfigError(f"this model has {what} (SaRA / selective fine-tuning) attached: LoRA on top would train "
                          "the same weights twice. Detach it first (sara_edu.sara.detach(unet) keeps the trained "
                          "weights: the model is plain again), or start from a fresh model.")
    if has_lora(unet) or getattr(unet, "_hf_peft_config_loaded", False):
        raise ConfigError("this model already has a LoRA adapter. Merge it first with merge_lora(unet), "
                          "or start from a fresh model.")


# -------------------------------------------------------------- save/load
_FORMAT = "sara-edu-lora"


def save_lora(unet: nn.Module, path) -> Path:
    """Write only the adapter weights (and their LoraConfig) to ``path`` (.safetensors), atomically."""
    from peft.utils import get_peft_model_state_dict

    if not has_lora(unet):
        raise ConfigError("this model has no LoRA adapter to save; train it with LoRA first")
    state = get_peft_model_state_dict(unet)
    cfg = unet.peft_config["default"]
    meta = {"format": _FORMAT,
            "lora_config": {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                            "target_modules": sorted(cfg.target_modules), "init_lora_weights": "gaussian"}}
    return save_tensors(state, path, meta)


def load_lora(unet: nn.Module, path, config=None) -> nn.Module:
    """Add the adapter saved at ``path`` to ``unet`` (a model with the same architecture).

    ``config`` (a :class:`LoRA`, a ``peft.LoraConfig`` or None) defaults to the one
    stored in the file.
    """
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    tensors, meta = load_tensors(path)
    if config is None:
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is not a LoRA file written by save_lora (no LoRA config inside); "
                                  "pass config=LoRA(rank=..., target_modules=...) to load it anyway")
        config = LoraConfig(**meta["lora_config"])
    elif isinstance(config, LoRA):
        config = config.config()
    _check_no_adapter(unet)
    targeted_modules(unet, config.target_modules, strict=False)
    unet.add_adapter(config)
    try:
        expected = set(get_peft_keys(unet))
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit this model's LoRA layers: {len(missing)} missing "
                                  f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}). "
                                  "Load it into the model (and target modules) it was trained on.")
        try:
            set_peft_model_state_dict(unet, tensors)
        except RuntimeError as e:  # shape mismatch: another rank or another model size
            raise CheckpointError(f"{path} does not fit this model's LoRA layers ({str(e).splitlines()[0]}...). "
                                  "Was it saved with another rank or for another model?") from e
    except BaseException:
        unet.unload_lora()  # leave the model as it was
        raise
    return unet


def get_peft_keys(unet: nn.Module) -> list[str]:
    """The adapter's state-dict keys as save_lora writes them."""
    from peft.utils import get_peft_model_state_dict

    return list(get_peft_model_state_dict(unet))


# ------------------------------------------------------------------ merge
def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold ``(alpha/r) B A`` into each wrapped weight and remove the adapter layers.

    Afterwards the model is a plain diffusers UNet (no peft modules, same state
    dict keys as before LoRA) computing the same outputs as the adapted model.
    """
    if not has_lora(unet):
        raise ConfigError("this model has no LoRA adapter to merge")
    unet.fuse_lora()
    unet.unload_lora()
    for attr in ("lora_scale", "_safe_fusing"):  # bookkeeping fuse_lora leaves behind
        if attr in vars(unet):
            delattr(unet, attr)
    assert not has_lora(unet), "peft layers left after unload_lora"
    return unet
