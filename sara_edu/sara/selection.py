"""Which weights are "temporarily ineffective"? Pick the small-|w| entries of a model.

SaRA (and the selective baseline) trains only the entries of a pretrained model
whose magnitude is small. This module finds them, either

* by an **absolute threshold** ``θ``: every entry with ``|w| < θ`` (the authors
  use ``θ = 2e-3`` on Stable Diffusion 1.5), or
* by a **fraction**: the smallest ``fraction`` of entries, with ``θ`` the
  ``fraction``-quantile of ``|w|`` taken over all considered parameters
  (``per_layer=False``) or separately inside each parameter (``per_layer=True``).
  The quantile follows ``torch.quantile`` (linear interpolation) and the
  selection is again ``|w| < θ``, so progressive adjustment can reuse ``θ``.

Memory: a global quantile over an 860M-parameter UNet must not concatenate all
weights (4 GB, and ``torch.quantile`` refuses more than 2**24 elements). We use
an exact two-pass **radix select** on the float bit pattern instead: for
non-negative floats the int32 bit pattern is ordered like the value, so a
65,536-bin histogram of the top 16 bits (pass 1, accumulated layer by layer)
tells which bin holds the k-th smallest ``|w|``, and a histogram of the low 16
bits inside that bin (pass 2) pins the exact value. Transient memory is a few
copies of one layer. Selected positions are stored as sorted flat indices, int32
when the tensor has fewer than 2**31 entries (half the memory of int64).
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

_INT32_LIMIT = 2**31 - 1
_BINS = 1 << 16


# --------------------------------------------------------------------------- what to consider


def considered_parameters(model: nn.Module, target_modules=None, layer_types=None,
                          include_frozen: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs SaRA may train, in ``named_parameters`` order.

    By default every floating-point parameter that requires grad (like the
    authors' release, which trains the whole UNet): a part the user froze with
    ``requires_grad_(False)`` before attaching stays frozen, unless
    ``include_frozen=True``.
    ``target_modules``: a string or list of strings; a parameter is kept when one of
    them matches its full name with :func:`re.search` (so plain substrings such as
    ``"attn"`` or ``"ff"`` work, and so do regexes such as ``r"attn\\d\\.to_[qkv]"``).
    ``layer_types``: a module class or tuple of classes (e.g. ``(nn.Linear, nn.Conv2d)``);
    a parameter is kept when the module that owns it is an instance of one.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module (e.g. pipe.unet), got {type(model).__name__}")
    patterns = _compile_patterns(target_modules)
    if layer_types is not None:
        if isinstance(layer_types, type):
            layer_types = (layer_types,)
        layer_types = tuple(layer_types)
        if not layer_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types):
            raise ConfigError("layer_types must be nn.Module classes such as (nn.Linear, nn.Conv2d), "
                              f"got {layer_types!r}")
    owner_ok = {}
    if layer_types is not None:
        for mod_name, mod in model.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                owner_ok[full] = isinstance(mod, layer_types)
    out = []
    frozen = 0
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if not (p.requires_grad or include_frozen):
            frozen += 1
            continue
        if patterns is not None and not any(pat.search(name) for pat in patterns):
            continue
        if layer_types is not None and not owner_ok.get(name, False):
            continue
        out.append((name, p))
    if not out and frozen and frozen == sum(p.is_floating_point() for p in model.parameters()):
        raise ConfigError(
            f"every parameter of this {type(model).__name__} has requires_grad=False, and SaRA leaves frozen "
            "parameters frozen. Unfreeze what should train (model.requires_grad_(True)) or pass "
            "include_frozen=True.")
    if not out:
        example = next((n for n, _ in model.named_parameters()), "<no parameters>")
        raise ConfigError(
            f"no parameter matches target_modules={target_modules!r}, layer_types={layer_types!r}. "
            f"Parameter names look like {example!r}; use substrings or regexes of such names.")
    return out


def _compile_patterns(target_modules):
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    target_modules = list(target_modules)
    if not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ConfigError(f"target_modules must be a string or a list of strings, got {target_modules!r}")
    try:
        return [re.compile(t) for t in target_modules]
    except re.error as e:
        raise ConfigError(f"target_modules contains an invalid regular expression ({e})") from e


# --------------------------------------------------------------------------- exact quantiles of |w|


def _abs_halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high 16 bits of ``|t|``, low 16 bits of ``t``) of the float32 bit patterns, as int16.

    For non-negative floats the bit pattern is ordered like the value (NaN
    last), so the high half of ``|t|`` is a 65,536-bin histogram key. On
    little-endian machines the halves are strided *views* of the weight, so a
    pass costs one 2-byte ``&`` and a bincount: about 4x faster than
    ``abs().view(int32) >> 16``.
    """
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    if sys.byteorder == "little":
        halves = flat.view(torch.int16)
        return halves[1::2] & 0x7FFF, halves[0::2]
    bits = flat.view(torch.int32) & 0x7FFFFFFF
    return (bits >> 16).to(torch.int16), (bits & 0xFFFF).to(torch.int16)


def abs_order_statistics(tensors, ranks) -> list[float]:
    """The ``ranks``-th smallest values (0-based) of ``|w|`` over all ``tensors``, exactly.

    ``tensors`` is a list of tensors (any devices); they are never concatenated.
    Two passes of radix select on the float32 bit pattern (see module docstring).
    """
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    ranks = [int(r) for r in ranks]
    if any(not 0 <= r < total for r in ranks):
        raise ConfigError(f"rank out of range for {total} values: {ranks}")
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for t in tensors:
        high, _ = _abs_halves(t)
        hist += torch.bincount(high, minlength=_BINS).cpu()
    cum = hist.cumsum(0)
    high_bin = {r: int(torch.searchsorted(cum, torch.tensor(r), right=True)) for r in ranks}
    below = {r: (int(cum[high_bin[r] - 1]) if high_bin[r] > 0 else 0) for r in ranks}
    low_hist = {b: torch.zeros(_BINS, dtype=torch.int64) for b in set(high_bin.values())}
    for t in tensors:
        high, low = _abs_halves(t)
        for b, h in low_hist.items():
            inside = low[high == b].to(torch.int32) & 0xFFFF
            if inside.numel():
                h += torch.bincount(inside, minlength=_BINS).cpu()
    out = []
    for r in ranks:
        b = high_bin[r]
        low = int(torch.searchsorted(low_hist[b].cumsum(0), torch.tensor(r - below[r]), right=True))
        out.append(torch.tensor([(b << 16) | low], dtype=torch.int32).view(torch.float32).item())
    return out


def abs_quantile(tensors, q: float) -> float:
    """``torch.quantile(|cat(tensors)|, q)`` (linear interpolation) without concatenating.

    The arithmetic mirrors torch's float32 computation so that, on inputs torch can
    handle, the result is the same number; it also works above 2**24 elements.
    """
    tensors = list(tensors)
    n = sum(t.numel() for t in tensors)
    if n == 0:
        raise ConfigError("no values to take a quantile of")
    pos = torch.tensor(q, dtype=torch.float32) * (n - 1)
    lo = int(pos.floor().item())
    hi = min(lo + 1, n - 1)
    v_lo, v_hi = abs_order_statistics(tensors, [lo, hi])
    weight = pos - lo
    return torch.tensor(v_lo).lerp(torch.tensor(v_hi), weight).item()


# --------------------------------------------------------------------------- the selection


@dataclass
class Selection:
    """Which entries of which parameters are selected (``|w| < threshold``).

    ``indices[name]`` are sorted flat (row-major) positions, int32 when possible,
    on the parameter's device. ``thresholds[name]`` is the θ used for that
    parameter (the same for every parameter unless ``per_layer``).
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    indices: dict[str, torch.Tensor]
    thresholds: dict[str, float]
    mode: str  # "threshold" | "fraction" | "per_layer_fraction"
    requested: float  # the θ or the fraction that was asked for
    extra: dict = field(default_factory=dict)

    @property
    def total_numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def total_selected(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def fraction(self) -> float:
        return self.total_selected / max(self.total_numel, 1)

    def mask(self, name: str) -> torch.Tensor:
        """The dense boolean mask of one parameter (allocates one layer)."""
        idx = self.indices[name]
        m = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool, device=idx.device)
        m[idx] = True
        return m.view(self.shapes[name])

    def report(self):
        """One row per considered parameter plus a ``TOTAL`` row (a pandas DataFrame)."""
        import pandas as pd

        rows = []
        for name in self.names:
            numel = math.prod(self.shapes[name])
            sel = int(self.indices[name].numel())
            rows.append({"name": name, "shape": tuple(self.shapes[name]), "numel": numel, "selected": sel,
                         "fraction": sel / max(numel, 1), "threshold": self.thresholds[name]})
        df = pd.DataFrame(rows, columns=["name", "shape", "numel", "selected", "fraction", "threshold"])
        total = {"name": "TOTAL", "shape": (), "numel": int(df.numel.sum()), "selected": int(df.selected.sum()),
                 "fraction": self.fraction,
                 "threshold": self.requested if self.mode == "threshold" else
                 (self.extra.get("global_threshold", float("nan")))}
        return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def check_selection_args(threshold=None, fraction=None, per_layer=False) -> None:
    """Raise :class:`ConfigError` for impossible selection settings."""
    if threshold is not None and fraction is not None:
        raise ConfigError(f"give either threshold (absolute θ, |w| < θ) or fraction (smallest share of "
                          f"weights), not both: threshold={threshold!r}, fraction={fraction!r}")
    if threshold is None and fraction is None:
        raise ConfigError("give threshold (e.g. 2e-3, the authors' value for SD1.5) or fraction (e.g. 0.1)")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold <= 0:
            raise ConfigError(f"threshold must be a positive finite number (|w| < threshold is trained), "
                              f"got {threshold!r}; the authors use 2e-3 on Stable Diffusion 1.5")
        if per_layer:
            raise ConfigError("per_layer=True only applies to fraction-based selection; "
                              "use fraction=... with per_layer=True, or drop per_layer")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0 < fraction < 1):
            raise ConfigError(f"fraction must be strictly between 0 and 1 (e.g. 0.1 for the smallest 10% "
                              f"of weights), got {fraction!r}")


@torch.no_grad()
def select_parameters(model: nn.Module, threshold: float | None = None, fraction: float | None = None,
                      per_layer: bool = False, target_modules=None, layer_types=None,
                      include_frozen: bool = False) -> Selection:
    """Select the small-magnitude entries of ``model`` (see module docstring).

    Exactly one of ``threshold`` (absolute θ) and ``fraction`` must be given.
    Parameters with ``requires_grad=False`` are left out unless ``include_frozen``.
    Raises :class:`ConfigError` for bad values and when nothing is selected
    (the message suggests a threshold from the weights' quantiles), and
    :class:`CheckpointError` when a considered weight is NaN or infinite (such
    entries have no magnitude to rank, so the model itself must be fixed).

    Ties at zero: the rule is always ``|w| < θ``. With a fraction, θ is the
    quantile of ``|w|``, so when at least ``fraction`` of the values are exactly 0,
    θ = 0 and those values are *not* selected. With ``per_layer=True`` such a
    layer (e.g. an all-zero bias) trains nothing; its name is listed in
    ``selection.extra["zero_threshold_layers"]``. Pass a ``threshold`` to train
    the zeros: any positive θ selects them. But a θ that selects nothing except
    whole all-zero parameters of a model with non-zero weights (a tiny θ finding
    zero-initialised norm biases) trains no small weight: that is refused.
    """
    check_selection_args(threshold, fraction, per_layer)
    params = considered_parameters(model, target_modules, layer_types, include_frozen)
    check_finite(params)
    names = [n for n, _ in params]
    shapes = {n: tuple(p.shape) for n, p in params}
    extra = {}
    if threshold is not None:
        mode, thresholds = "threshold", {n: float(threshold) for n in names}
    elif per_layer:
        mode = "per_layer_fraction"
        thresholds = {n: abs_quantile([p], fraction) for n, p in params}
        extra["zero_threshold_layers"] = [n for n in names if thresholds[n] == 0]
    else:
        mode = "fraction"
        theta = abs_quantile([p for _, p in params], fraction)
        thresholds = {n: theta for n in names}
        extra["global_threshold"] = theta
    indices = {n: _indices_below(p, thresholds[n]) for n, p in params}
    sel = Selection(names, shapes, indices, thresholds, mode, float(threshold if threshold is not None else fraction),
                    extra)
    if sel.total_selected == 0:
        raise ConfigError(_nothing_selected(params, threshold, fraction, per_layer, sel.total_numel))
    # A pretrained model whose only selected entries are whole all-zero tensors (zero-initialised norm biases,
    # say: what a tiny θ finds) has no small weight selected: that is no SaRA run. (In an all-zero model the
    # zeros are all there is, and a threshold trains them, as _nothing_selected suggests.)
    zero_tensors = [n for n, p in params if len(indices[n]) == p.numel() and not bool(p.detach().any())]
    if sum(len(indices[n]) for n in zero_tensors) == sel.total_selected < sel.total_numel:
        raise ConfigError(_only_zero_tensors(params, zero_tensors, sel))
    return sel


def _only_zero_tensors(params, zero_tensors, sel) -> str:
    """Why a selection of whole all-zero tensors (zero-initialised biases, ...) is not SaRA, and a θ that is."""
    tensors = [p for _, p in params]
    zeros = sum(int((p.detach() == 0).sum()) for p in tensors)
    smallest = abs_order_statistics(tensors, [zeros])[0]
    q10 = abs_quantile(tensors, 0.1)
    setting = f"{'threshold' if sel.mode == 'threshold' else 'fraction'}={sel.requested:g}"
    more = f" and {len(zero_tensors) - 2} more" if len(zero_tensors) > 2 else ""
    return (f"{setting} selects nothing useful to train: its {sel.total_selected:,} entries are whole parameters "
            f"that are exactly 0 ({', '.join(zero_tensors[:2])}{more}; {len(zero_tensors)} tensor{'s' if len(zero_tensors) > 1 else ''}, usually "
            f"zero-initialised biases of norm layers), and no non-zero weight has |w| < θ = "
            f"{max(sel.thresholds.values()):.3g} (the smallest non-zero |w| is {smallest:.3g}). SaRA trains the "
            f"small weights of a pretrained model: choose θ well above that, e.g. threshold={q10:.2g} (the 10% "
            "quantile of |w|), or fraction=0.1.")


def check_finite(params) -> None:
    """Raise :class:`CheckpointError` naming every ``(name, parameter)`` that holds NaN or inf."""
    bad = []
    for name, p in params:
        w = p.detach()
        if not bool(torch.isfinite(w).all()):
            nan, inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
            bad.append(f"{name} has {nan:,} NaN and {inf:,} infinite values among {w.numel():,}")
    if bad:
        more = f" (and {len(bad) - 3} more parameters)" if len(bad) > 3 else ""
        raise CheckpointError(
            f"the model's weights are not finite: {'; '.join(bad[:3])}{more}. NaN and inf have no magnitude "
            "to select by, and training from them fails. They come from a diverged run or a damaged file: "
            "reload the pretrained weights (and lower the learning rate if a run diverged).")


def _nothing_selected(params, threshold, fraction, per_layer, total) -> str:
    """Why nothing was selected, and a setting that selects something."""
    tensors = [p for _, p in params]
    if threshold is not None:
        q10 = abs_quantile(tensors, 0.1)
        return (f"threshold={threshold:g} selects no weight (no |w| below it among {total:,} values). The 10% "
                f"quantile of |w| is {q10:.3g}: try threshold={q10:.2g}, or fraction=0.1.")
    zeros = sum(int((p.detach() == 0).sum()) for p in tensors)
    where = " in every layer" if per_layer else ""
    if zeros == total:
        return (f"fraction={fraction:g} selects no weight: all {total:,} considered weights are exactly 0, so "
                "this model looks untrained or zeroed (pruned, or built without loading its weights). SaRA "
                "fine-tunes the small weights of a pretrained model: load one (e.g. load_pretrained()). To train "
                "every entry anyway, give a threshold instead (any positive one, e.g. threshold=1e-8).")
    below_nonzero = abs_order_statistics(tensors, [zeros])[0] / 2  # under the smallest non-zero |w|
    larger = "" if per_layer else f", or ask for a fraction above {zeros / total:.2f}"
    return (f"fraction={fraction:g} selects no weight{where}: {zeros / total:.1%} of the {total:,} considered "
            f"weights are exactly 0, so θ = 0 and the rule |w| < θ selects none of the tied zeros. Train "
            f"exactly the zeros with threshold={below_nonzero:.2g} (below every non-zero |w|){larger}.")


def _indices_below(p: torch.Tensor, theta: float) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    idx = torch.nonzero(flat.abs() < theta).view(-1)
    return idx.to(torch.int32) if p.numel() <= _INT32_LIMIT else idx


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 for tensors SaRA can index with 32 bits, else int64."""
    return torch.int32 if numel <= _INT32_LIMIT else torch.int64
