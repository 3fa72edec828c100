"""Weight statistics: which parameters of a pretrained UNet are small, where, and for how long.

SaRA's starting observation is that the smallest-|w| parameters of a pretrained
diffusion UNet barely matter, and that *which* ones are small keeps changing
during pretraining: they are "temporarily ineffective", not useless. This module
measures both:

* :func:`weight_stats` / :func:`kind_stats`: a table per parameter tensor (and
  per kind of layer) with |w| quantiles and the fraction below a threshold θ;
* :func:`global_vs_per_layer`: what one global threshold does to each layer,
  compared with taking the same fraction of every layer;
* :func:`pretraining_snapshots` + :func:`smallest_set_stability`: how much of the
  smallest-|w| set at an intermediate checkpoint is still smallest at the end.

Functions accept a model in any of three forms: a :class:`~sara_edu.world.model.TinyDiffusion`
(its UNet is used), an ``nn.Module``, or a dict name -> tensor (a state dict).
Global thresholds never concatenate the weights (they use ``sara_edu.sara.selection``'s
exact radix select); the overlap and histogram tools do concatenate |w| once,
which is 7 MB for the course model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ConfigError

#: Kinds of layer, in the order figures and tables use.
KINDS = ("conv", "attention q", "attention k", "attention v", "attention out", "attention proj",
         "feed-forward", "norm", "time embedding", "other")

_KIND_RULES = (  # first match wins: "conv_norm_out" is a norm, "time_emb_proj" a time embedding
    ("norm", re.compile(r"(^|\.)(norm\d*|conv_norm_out)\.")),
    ("time embedding", re.compile(r"(^|\.)(time_embedding|time_emb_proj|add_embedding|class_embedding)\.")),
    ("attention q", re.compile(r"\.to_q\.")),
    ("attention k", re.compile(r"\.to_k\.")),
    ("attention v", re.compile(r"\.to_v\.")),
    ("attention out", re.compile(r"\.to_out\.")),
    ("attention proj", re.compile(r"(^|\.)(proj_in|proj_out)\.")),
    ("feed-forward", re.compile(r"\.ff\.")),
    ("conv", re.compile(r"(^|\.)(conv\w*)\.")),
)


def parameter_kind(name: str) -> str:
    """The kind of layer a parameter belongs to, from its diffusers name (one of :data:`KINDS`)."""
    for kind, pattern in _KIND_RULES:
        if pattern.search(name):
            return kind
    return "other"


def block_of(name: str) -> str:
    """The UNet block a parameter sits in: ``down_blocks.1``, ``mid_block``, ``conv_in``, ..."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def layer_of(name: str) -> str:
    """The module a parameter belongs to: its name without ``.weight`` / ``.bias``."""
    return name.rsplit(".", 1)[0] if "." in name else name


def named_weights(model) -> dict[str, torch.Tensor]:
    """Name -> parameter tensor (detached, not copied) for a pipe, a module or a state dict."""
    if hasattr(model, "unet") and isinstance(getattr(model, "unet"), torch.nn.Module):
        model = model.unet
    if isinstance(model, torch.nn.Module):
        return {n: p.detach() for n, p in model.named_parameters()}
    if isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values()):
        if not model:
            raise ConfigError("got an empty state dict; pass a model with parameters")
        return {n: t.detach() for n, t in model.items() if t.is_floating_point()}
    raise ConfigError(f"expected a TinyDiffusion, an nn.Module or a dict of tensors, got {type(model).__name__}")


def all_abs_values(model) -> torch.Tensor:
    """|w| of every parameter as one flat float32 CPU vector (a copy: fine at course scale)."""
    return torch.cat([w.abs().flatten().float().cpu() for w in named_weights(model).values()])


def threshold_from_values(values: torch.Tensor, fraction: float) -> float:
    """θ such that ``round(fraction * N)`` of ``values`` are strictly below it (ties may make it fewer).

    ``fraction=0`` gives the smallest value (nothing below it); ``fraction=1`` gives
    infinity (everything below it). Otherwise θ is one of ``values``, so comparing
    weights of the same dtype against it is exact.
    """
    _check_fraction(fraction)
    values = values.flatten()
    n = values.numel()
    if n == 0:
        raise ConfigError("no values to take a threshold of")
    k = int(round(fraction * n))
    if k >= n:
        return float("inf")  # everything finite is below it, whatever the dtype it is compared in
    return float(torch.kthvalue(values.float().cpu(), k + 1).values)


def global_thresholds(model, fractions) -> list[float]:
    """For each fraction, the θ below which that fraction of *all* parameters (|w|) lie.

    Same convention as :func:`threshold_from_values`, computed exactly without
    concatenating the weights (``selection.abs_order_statistics``: radix select on
    the float bits), so it also works for a billion-parameter UNet.
    """
    from ..sara.selection import abs_order_statistics

    tensors = list(named_weights(model).values())
    n = sum(t.numel() for t in tensors)
    for f in fractions:
        _check_fraction(f)
    ks = [int(round(f * n)) for f in fractions]
    inside = sorted({k for k in ks if k < n})
    values = dict(zip(inside, abs_order_statistics(tensors, inside))) if inside else {}
    return [values[k] if k < n else float("inf") for k in ks]


def global_threshold(model, fraction: float) -> float:
    """θ below which ``fraction`` of *all* parameters (|w|) lie (see :func:`global_thresholds`)."""
    return global_thresholds(model, [fraction])[0]


def weight_stats(model, threshold: float | None = None, quantiles=(0.01, 0.1, 0.5, 0.9)):
    """One row per parameter tensor: where it sits, how big it is, how its |w| is spread.

    Columns: ``name, layer, block, kind, role, shape, numel, mean_abs, std, max_abs``,
    one ``q<percent>`` column per quantile of |w|, ``zeros`` (exact zeros) and, if
    ``threshold`` is given, ``frac_below`` (fraction with |w| < threshold).
    Rows are in the model's forward order (``named_parameters`` order).
    """
    import pandas as pd

    qs = torch.tensor(list(quantiles), dtype=torch.float64)
    if len(qs) and not ((qs >= 0) & (qs <= 1)).all():
        raise ConfigError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not threshold > 0):
        raise ConfigError(f"threshold must be a positive number (|w| < threshold counts as small, e.g. 2e-3) or "
                          f"None, got {threshold!r}")
    rows = []
    for name, w in named_weights(model).items():
        a = w.abs().flatten().double().cpu()
        row = {"name": name, "layer": layer_of(name), "block": block_of(name), "kind": parameter_kind(name),
               "role": name.rsplit(".", 1)[-1], "shape": tuple(w.shape), "numel": a.numel(),
               "mean_abs": float(a.mean()), "std": float(w.double().std()) if a.numel() > 1 else 0.0,
               "max_abs": float(a.max())}
        if len(qs):
            for q, v in zip(quantiles, torch.quantile(a, qs).tolist()):
                row[_quantile_column(q)] = v
        row["zeros"] = int((a == 0).sum())
        if threshold is not None:
            row["frac_below"] = float((a < threshold).double().mean())
        rows.append(row)
    return pd.DataFrame(rows)


def _quantile_column(q: float) -> str:
    return f"q{100 * q:g}"


def kind_stats(model, threshold: float | None = None):
    """One row per kind of layer: tensors, parameters, share of the model, mean |w|, median |w|
    and (with ``threshold``) the fraction of that kind's parameters with |w| < threshold."""
    import pandas as pd

    groups: dict[str, list[torch.Tensor]] = {}
    for name, w in named_weights(model).items():
        groups.setdefault(parameter_kind(name), []).append(w.abs().flatten().float().cpu())
    total = sum(sum(t.numel() for t in ts) for ts in groups.values())
    rows = []
    for kind in [k for k in KINDS if k in groups]:
        a = torch.cat(groups[kind])
        row = {"kind": kind, "tensors": len(groups[kind]), "numel": a.numel(), "share": a.numel() / total,
               "mean_abs": float(a.double().mean()), "median_abs": float(a.median())}
        if threshold is not None:
            row["frac_below"] = float((a < threshold).double().mean())
        rows.append(row)
    return pd.DataFrame(rows)


def global_vs_per_layer(model, fraction: float = 0.1):
    """What "the smallest ``fraction``" means globally versus in every layer separately.

    One row per parameter tensor with ``per_layer_threshold`` (its own quantile),
    ``global_threshold`` (the same θ for all) and ``global_fraction``: the share of
    the tensor a global threshold selects. Per layer, every tensor gives exactly
    ``fraction``; globally, layers with small weights give much more and layers
    with large weights (norms) nothing at all.
    """
    import pandas as pd

    _check_fraction(fraction)
    weights = named_weights(model)
    theta = global_threshold(weights, fraction)
    rows = []
    for name, w in weights.items():
        a = w.abs().flatten().float().cpu()
        rows.append({"name": name, "layer": layer_of(name), "block": block_of(name), "kind": parameter_kind(name),
                     "numel": a.numel(), "global_threshold": theta,
                     "per_layer_threshold": threshold_from_values(a, fraction),
                     "global_fraction": float((a < theta).double().mean()),
                     "per_layer_fraction": int(round(fraction * a.numel())) / a.numel()})
    return pd.DataFrame(rows)


def smallest_mask(model, fraction: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Boolean masks marking the smallest-|w| ``fraction`` of parameters.

    ``scope="global"``: the ``round(fraction * N)`` smallest of all N parameters;
    ``scope="per_layer"``: the same fraction of each tensor. Ranks, not a
    threshold, decide, so the set has exactly that many entries even when
    float16 checkpoints make values tie (ties go to the earlier index).
    """
    _check_fraction(fraction)
    weights = named_weights(model)
    if scope == "global":
        flat = torch.cat([w.abs().flatten().float().cpu() for w in weights.values()])
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[_smallest_indices(flat, fraction)] = True
        masks, start = {}, 0
        for name, w in weights.items():
            masks[name] = chosen[start:start + w.numel()].view(w.shape)
            start += w.numel()
        return masks
    if scope == "per_layer":
        masks = {}
        for name, w in weights.items():
            m = torch.zeros(w.numel(), dtype=torch.bool)
            m[_smallest_indices(w.abs().flatten().float().cpu(), fraction)] = True
            masks[name] = m.view(w.shape)
        return masks
    raise ConfigError(f"scope must be 'global' or 'per_layer', got {scope!r}")


def _smallest_indices(values: torch.Tensor, fraction: float) -> torch.Tensor:
    k = int(round(fraction * values.numel()))
    return torch.sort(values, stable=True).indices[:k]


def mask_overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """How much two selections agree: sizes, intersection, Jaccard |A∩B|/|A∪B| and
    ``retained`` = |A∩B|/|A| (the share of A that is also in B)."""
    if set(a) != set(b):
        raise ConfigError("the two masks cover different parameters; compute both from the same architecture")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ConfigError(f"mask shapes differ for {name}: {tuple(a[name].shape)} vs {tuple(b[name].shape)}")
    flat_a = torch.cat([a[n].flatten() for n in a])  # one vector: three reductions instead of three per tensor
    flat_b = torch.cat([b[n].flatten() for n in a])
    inter, size_a, size_b = int((flat_a & flat_b).sum()), int(flat_a.sum()), int(flat_b.sum())
    union = size_a + size_b - inter
    return {"size_a": size_a, "size_b": size_b, "intersection": inter,
            "jaccard": inter / union if union else 1.0, "retained": inter / size_a if size_a else float("nan")}


@dataclass
class Snapshot:
    """Weights at one point of pretraining: ``progress`` is the fraction of pretraining done."""

    name: str
    step: int
    progress: float
    weights: dict[str, torch.Tensor]


def pretraining_snapshots(folder=None) -> list[Snapshot]:
    """The shipped intermediate checkpoints (float16, saved at 5/25/50/75% of pretraining)
    and the final weights, in training order, each as a :class:`Snapshot`."""
    import json
    from pathlib import Path

    from ..world.model import list_checkpoints, load_pretrained
    from ..world.paths import PRETRAINED_DIR, check_data_dir

    if folder is None:
        check_data_dir()
    folder = Path(folder or PRETRAINED_DIR)
    names = list_checkpoints(folder)
    if not names:
        raise CheckpointError(f"no pretraining checkpoints in {folder / 'checkpoints'}; run `make data` to create them")
    try:
        total = int(json.loads((folder / "config.json").read_text())["recipe"]["steps"])
    except (OSError, KeyError, ValueError, TypeError):
        total = None  # progress unknown: fall back to the order of the checkpoints
    snapshots = []
    for i, name in enumerate(names):
        match = re.search(r"(\d+)$", name)
        step = int(match.group(1)) if match else i
        progress = step / total if total else (i + 1) / (len(names) + 1)
        snapshots.append(Snapshot(name, step, progress, named_weights(load_pretrained(folder, checkpoint=name))))
    final_step = total if total else len(names) + 1
    snapshots.append(Snapshot("final", final_step, 1.0, named_weights(load_pretrained(folder))))
    return snapshots


def smallest_set_stability(snapshots: list[Snapshot], fraction: float = 0.1, scope: str = "global",
                           reference: Snapshot | None = None):
    """For every snapshot: how much of its smallest-``fraction`` set is still smallest in ``reference``
    (default: the last snapshot, the final weights).

    Columns: ``name, step, progress, retained, jaccard, chance``. ``chance`` is what
    two unrelated random sets of the same size would give (retained = fraction): a
    value near it means being small at that point said nothing about the end.
    """
    import pandas as pd

    if not snapshots:
        raise ConfigError("no snapshots given; use pretraining_snapshots()")
    reference = reference or snapshots[-1]
    ref_mask = smallest_mask(reference.weights, fraction, scope)
    rows = []
    for snap in snapshots:
        o = mask_overlap(smallest_mask(snap.weights, fraction, scope), ref_mask)
        rows.append({"name": snap.name, "step": snap.step, "progress": snap.progress, "retained": o["retained"],
                     "jaccard": o["jaccard"], "chance": fraction})
    return pd.DataFrame(rows)


def _check_fraction(fraction):
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ConfigError(f"fraction must be a number in [0, 1] (0.1 = 10%), got {fraction!r}")


# ----------------------------------------------------------------------------- figures

def abs_values_frame(model, by: str = "kind", layers=None, max_per_group: int = 50_000, seed: int = 0):
    """Long DataFrame (``abs_w``, ``group``) for seaborn, nonzero |w| only.

    ``by="kind"`` groups by :func:`parameter_kind`; ``by="layer"`` by parameter name
    (optionally only ``layers``). Groups larger than ``max_per_group`` are randomly
    subsampled (seeded) so plotting stays fast; the histogram shape is unchanged.
    """
    import numpy as np
    import pandas as pd

    if by not in ("kind", "layer"):
        raise ConfigError(f"by must be 'kind' or 'layer', got {by!r}")
    weights = named_weights(model)
    if layers is not None:
        missing = [n for n in layers if n not in weights]
        if missing:
            raise ConfigError(f"unknown parameter(s) {missing[:3]}; see weight_stats(model).name")
        weights = {n: weights[n] for n in layers}
    groups: dict[str, list[torch.Tensor]] = {}
    for name, w in weights.items():
        groups.setdefault(parameter_kind(name) if by == "kind" else name, []).append(w.abs().flatten().float().cpu())
    rng = np.random.default_rng(seed)
    frames = []
    order = [k for k in KINDS if k in groups] if by == "kind" else list(groups)
    for group in order:
        a = torch.cat(groups[group]).numpy()
        a = a[a > 0]
        if len(a) > max_per_group:
            a = rng.choice(a, max_per_group, replace=False)
        frames.append(pd.DataFrame({"abs_w": a, "group": group}))
    return pd.concat(frames, ignore_index=True)


def plot_abs_histograms(model, by: str = "kind", layers=None, thresholds: dict | None = None, ax=None,
                        max_per_group: int = 50_000):
    """Histograms of |w| on a log-x axis, one curve per kind of layer (or per tensor).

    Each curve is normalised on its own (``common_norm=False``) so small kinds are
    visible beside the big conv layers. ``thresholds``: label -> θ drawn as
    vertical lines (e.g. ``{"θ = 2e-3": 2e-3}``). Returns the Figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = abs_values_frame(model, by=by, layers=layers, max_per_group=max_per_group)
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 4.2))
    fig = ax.figure
    sns.histplot(data=data, x="abs_w", hue="group", log_scale=True, element="step", fill=False, stat="density",
                 common_norm=False, bins=80, ax=ax)
    legend = ax.get_legend()
    if legend is not None:
        legend.set_title("kind of layer" if by == "kind" else "parameter")
    for i, (label, theta) in enumerate((thresholds or {}).items()):
        ax.axvline(theta, color="k", ls=["--", ":", "-."][i % 3], lw=1.2, label=label)
        # written along the line, so labels of nearby thresholds do not collide
        ax.text(theta, 0.97, f"{label} ", transform=ax.get_xaxis_transform(), rotation=90, va="top", ha="right",
                fontsize=8)
    ax.set_xlabel("|w| (absolute weight value, weight units, log scale)")
    ax.set_ylabel("density (per unit of log10 |w|)")
    ax.set_title("How large are the weights? |w| by " + ("kind of layer" if by == "kind" else "parameter"))
    fig.tight_layout()
    return fig


def block_rank(block: str) -> int:
    """Position of a UNet block in the forward pass (down -> mid -> up), for sorting."""
    head, _, index = block.partition(".")
    fixed = {"conv_in": 0, "time_embedding": 1, "class_embedding": 2, "add_embedding": 3, "mid_block": 50,
             "conv_norm_out": 90, "conv_act": 91, "conv_out": 92}
    if head == "down_blocks" and index.isdigit():
        return 10 + int(index)
    if head == "up_blocks" and index.isdigit():
        return 60 + int(index)
    return fixed.get(head, 99)


def _short_block(block: str) -> str:
    head, _, index = block.partition(".")
    names = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid", "conv_in": "in",
             "time_embedding": "time", "conv_norm_out": "out", "conv_out": "out"}
    return f"{names.get(head, head)} {index}".strip()


def per_layer(table, columns):
    """Aggregate a per-tensor table to one row per layer (module), in forward order.

    ``columns`` are fractions, averaged weighted by ``numel`` (so a layer's value is
    the share of *all* its parameters, weight and bias together).
    """
    t = table.assign(_order=range(len(table)), _rank=table["block"].map(block_rank))
    weighted = t[list(columns)].mul(t["numel"], axis=0)
    agg = (t[["layer", "block", "kind", "numel", "_rank", "_order"]].join(weighted)
           .groupby("layer", sort=False)
           .agg({"block": "first", "kind": "first", "numel": "sum", "_rank": "first", "_order": "min",
                 **{c: "sum" for c in columns}}))
    agg[list(columns)] = agg[list(columns)].div(agg["numel"], axis=0)
    return agg.sort_values(["_rank", "_order"]).drop(columns=["_rank", "_order"]).reset_index()


def _forward_axis(ax, table):
    """Label a per-layer x axis by UNet block (thin lines where a block starts, name in the middle)."""
    blocks = table["block"].tolist()
    starts = [i for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    ends = starts[1:] + [len(blocks)]
    ticks, labels = [], []
    for s, e in zip(starts, ends):
        if s:
            ax.axvline(s - 0.5, color="0.75", lw=0.8, zorder=0)
        if e - s >= 0.03 * len(blocks):  # blocks too narrow to label stay unlabelled
            ticks.append((s + e - 1) / 2)
            labels.append(_short_block(blocks[s]))
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8)
    ax.tick_params(axis="x", length=0)
    ax.set_xlim(-1, len(table))


def plot_fraction_by_layer(table, column: str, *, reference: float | None = None, reference_label: str = "",
                           ax=None, title: str = "", ylabel: str = "fraction of the layer's parameters"):
    """Bar per layer in forward order (down -> mid -> up), coloured by kind of layer.

    ``table``: per-tensor rows with ``layer, block, kind, numel`` and ``column`` (a
    fraction), e.g. from :func:`global_vs_per_layer` or ``pruning.fraction_below``;
    tensors of one layer are merged (numel-weighted). ``reference`` draws a line.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 3.6))
    fig = ax.figure
    layers = per_layer(table, [column])
    kinds = [k for k in KINDS if k in set(layers["kind"])]
    palette = dict(zip(KINDS, sns.color_palette("tab10", len(KINDS))))
    ax.bar(range(len(layers)), layers[column], color=[palette[k] for k in layers["kind"]], width=0.9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[k]) for k in kinds]
    labels = list(kinds)
    if reference is not None:
        handles.append(ax.axhline(reference, color="k", ls="--", lw=1))
        labels.append(reference_label or f"{reference:g}")
    # under the axis, not beside it: a legend on the right would make the figure wider than the notebook column
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=5,
              title="kind of layer", title_fontsize=7, frameon=False)
    _forward_axis(ax, layers)
    ax.set_ylim(0, max(1e-3, float(layers[column].max()), reference or 0) * 1.08)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(f"the UNet's {len(layers)} layers in forward order (input -> down -> mid -> up -> output)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_global_vs_per_layer(model, fraction: float = 0.1):
    """Two panels: the share of each kind of layer, and of each layer, that the smallest
    ``fraction`` *globally* selects, against the ``fraction`` a per-layer rule gives
    every layer. The logic behind notebook 01's fraction slider."""
    import matplotlib.pyplot as plt

    table = global_vs_per_layer(model, fraction)
    # one above the other: side by side, the ~100 layer bars would not fit the notebook column
    fig, (left, right) = plt.subplots(2, 1, figsize=(9, 7.4), gridspec_kw={"height_ratios": [1, 1.5]})
    by_kind = (table.assign(selected=table.global_fraction * table.numel).groupby("kind", sort=False)
               [["selected", "numel"]].sum())
    by_kind = by_kind.reindex([k for k in KINDS if k in by_kind.index])
    share = by_kind.selected / by_kind.numel
    left.barh(share.index, share.values, color="tab:blue", label=f"global {fraction:.0%} threshold")
    left.axvline(fraction, color="k", ls="--", lw=1, label=f"per-layer {fraction:.0%} (every kind)")
    left.invert_yaxis()
    left.set_xlabel("fraction of the kind's parameters selected")
    left.set_title(f"Smallest {fraction:.0%}: global vs per layer", fontsize=10)
    left.legend(fontsize=7, loc="lower right")
    plot_fraction_by_layer(table, "global_fraction", reference=fraction,
                           reference_label=f"per-layer {fraction:.0%}", ax=right,
                           title=f"Share of each layer below the global {fraction:.0%} threshold "
                                 f"θ = {table.global_threshold.iloc[0]:.2e}")
    fig.tight_layout()
    return fig


def final_percentiles(snapshot: Snapshot, final: Snapshot, fraction: float = 0.1) -> torch.Tensor:
    """Where the smallest-``fraction`` parameters of ``snapshot`` rank at the end.

    Returns, for each of them, its percentile of |w| in ``final`` (0 = smallest of
    all, 100 = largest). All below ``100 * fraction`` would mean "small once, small
    forever"; a spread over 0-100 means they became ordinary weights.
    """
    early = torch.cat([m.flatten() for m in smallest_mask(snapshot.weights, fraction).values()])
    late = torch.cat([w.abs().flatten().float().cpu() for w in named_weights(final.weights).values()])
    if early.numel() != late.numel():
        raise ConfigError("the two snapshots have different numbers of parameters; compare the same architecture")
    ranks = torch.empty(late.numel(), dtype=torch.float32)
    ranks[torch.sort(late, stable=True).indices] = torch.arange(late.numel(), dtype=torch.float32)
    return 100 * ranks[early] / late.numel()


def plot_stability(snapshots, fraction: float = 0.1, scope: str = "global"):
    """Notebook 01's "temporarily ineffective" figure (the logic behind its fraction slider).

    Left: for every pretraining checkpoint, the share of its smallest ``fraction`` of
    weights still among the smallest at the end (and the Jaccard overlap), against
    chance. Right: where the smallest weights of the *earliest* checkpoint rank at
    the end. ``snapshots`` from :func:`pretraining_snapshots`.
    """
    import matplotlib.pyplot as plt

    table = smallest_set_stability(snapshots, fraction, scope)
    fig, (ax, right) = plt.subplots(1, 2, figsize=(9, 3.9))
    x = 100 * table["progress"]
    ax.plot(x, table["retained"], "o-", label="retained: share still in the final smallest set")
    ax.plot(x, table["jaccard"], "s--", label="Jaccard overlap with the final set")
    ax.plot(x, table["chance"], ":", color="0.4", label="chance (unrelated random sets)")
    for xi, yi in zip(x, table["retained"]):
        ax.annotate(f"{yi:.0%}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("pretraining progress (% of training steps)")
    ax.set_ylabel("overlap (fraction of the set)")
    ax.set_ylim(0, 1.08)
    ax.set_title(f"Are the smallest {fraction:.0%} the same\nweights over training?", fontsize=10)
    # upper left: the overlaps grow with pretraining, so the curves leave that corner empty (lower right, the
    # legend sat on the chance line)
    ax.legend(fontsize=7, loc="upper left")
    first = snapshots[0]
    pct = final_percentiles(first, snapshots[-1], fraction).numpy()
    right.hist(pct, bins=50, range=(0, 100), color="tab:purple")
    right.axvspan(0, 100 * fraction, color="tab:green", alpha=0.2, lw=0, zorder=0,
                  label=f"still in the final smallest {fraction:.0%}: {(pct < 100 * fraction).mean():.0%}")
    right.set_xlabel("percentile of |w| in the final model (0 = smallest)")
    right.set_ylabel("number of parameters")
    right.set_title(f"Where did the smallest {fraction:.0%} at {first.progress:.0%}\nof pretraining end up?",
                    fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_layer_histogram(model, name: str, fraction: float = 0.1):
    """|w| histogram of one parameter tensor (log x) with two thresholds for ``fraction``:
    the global one (same θ for the whole UNet) and the tensor's own per-layer one.
    The logic behind notebook 01's layer drop-down."""
    import matplotlib.pyplot as plt
    import numpy as np

    weights = named_weights(model)
    if name not in weights:
        raise ConfigError(f"no parameter {name!r}; see weight_stats(model).name for the names")
    a = weights[name].abs().flatten().float().cpu()
    theta_global = global_threshold(weights, fraction)
    theta_layer = threshold_from_values(a, fraction)
    nonzero = a[a > 0].numpy()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bins = np.logspace(np.log10(nonzero.min()), np.log10(nonzero.max()), 60)
    ax.hist(nonzero, bins=bins, color="tab:blue", alpha=0.8)
    ax.set_xscale("log")
    share = float((a < theta_global).double().mean())
    ax.axvline(theta_global, color="tab:red", ls="--",
               label=f"global {fraction:.0%} θ = {theta_global:.2e}: selects {share:.0%} of this tensor")
    ax.axvline(theta_layer, color="k", ls=":", label=f"per-layer {fraction:.0%} θ = {theta_layer:.2e}")
    ax.set_xlabel("|w| (absolute weight value, weight units, log scale)")
    ax.set_ylabel("number of parameters")
    ax.set_title(f"{name}  [{parameter_kind(name)}, {a.numel():,} parameters]", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
