"""Small looks inside a SaRA run: the helpers behind notebook 03 ("SaRA step by step").

* the **mask**: which share of every layer SaRA would train (:func:`mask_figure`);
* the **nuclear-norm term**: singular values of the learned update ``ΔW`` of
  a weight matrix (:func:`update_spectrum`, :func:`spectrum_table`,
  :func:`plot_update_spectra`), with and without the penalty;
* **progressive adjustment**: how many trained entries froze and how many went
  on training (:func:`churn_by_kind`, :func:`progressive_summary`,
  :func:`plot_progressive`);
* **memory**: what each option of SaRA's state buys, in bytes per trained entry
  and in difference from the exact path (:func:`state_bytes_table`, :func:`plot_state_bytes`);
* **save, load, merge**: file sizes (:func:`file_size_table`) and a check that
  a merged model is a plain model (:func:`plain_model_check`).

The functions that compare weights take models as a pipe, an ``nn.Module`` or a
state dict, so the same call works on the pretrained model and on any
fine-tuned copy of it.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError
from .weight_distributions import named_weights, parameter_kind

MB = 2**20


# --------------------------------------------------------------------------- SaRA from scratch (section 1)


class ScratchSaRA:
    """The learner's five pieces put together (notebook 03, section 1): nothing here decides anything.

    Holds the 1-D state of every selected weight (``w[M]``, ``W₀[M]``, AdamW's two
    moments), registers the gradient hook, and makes one step: the nuclear-norm
    subgradient of one random matrix (the library's draw: ``random.Random(seed)``
    over the selected matrices in the model's order), then AdamW on every
    selected vector and a scatter of the new values into the weights. The pieces
    are the exercise functions ``select_mask``, ``keep_selected``,
    ``nuclear_subgradient``, ``adamw_update`` and ``progressive_keep``.
    """

    STATES = ("positions", "values", "initial", "exp_avg", "exp_avg_sq")

    def __init__(self, model, theta: float, lam: float, lr: float, *, select_mask, keep_selected,
                 nuclear_subgradient, adamw_update, progressive_keep, seed: int = 0):
        import copy
        import random

        self.model = copy.deepcopy(model).double()  # float64: the check compares algorithms, not rounding
        self.theta, self.lam, self.lr, self.rng = theta, lam, lr, random.Random(seed)
        self.keep_selected, self.nuclear_subgradient = keep_selected, nuclear_subgradient
        self.adamw_update, self.progressive_keep = adamw_update, progressive_keep
        found = {n: select_mask(w, theta) for n, w in self.model.named_parameters()}
        self.positions = {n: i for n, i in found.items() if len(i)}
        self.values = {n: self.model.get_parameter(n).detach().flatten()[i].clone() for n, i in self.positions.items()}
        self.initial = {n: v.clone() for n, v in self.values.items()}  # W₀[M], for ΔW = w − W₀
        self.exp_avg = {n: torch.zeros_like(v) for n, v in self.values.items()}
        self.exp_avg_sq = {n: torch.zeros_like(v) for n, v in self.values.items()}
        self.grads = {}
        for name, weight in self.model.named_parameters():
            weight.requires_grad_(name in self.positions)
            if name in self.positions:  # runs as soon as autograd has this weight's gradient
                weight.register_post_accumulate_grad_hook(lambda w, name=name: self._hook(w, name))

    def _hook(self, weight, name):
        g = self.keep_selected(weight.grad, self.positions[name])
        self.grads[name] = self.grads[name] + g if name in self.grads else g
        weight.grad = None  # drop the dense gradient at once

    def step(self, k: int) -> None:
        weights = {n: self.model.get_parameter(n) for n in self.positions}
        matrices = [n for n, w in weights.items() if w.ndim == 2 and min(w.shape) > 1]
        chosen = self.rng.choice(matrices)
        delta = torch.zeros(weights[chosen].numel(), dtype=torch.float64)
        delta[self.positions[chosen]] = self.values[chosen] - self.initial[chosen]  # ΔW ⊙ M
        sub = self.nuclear_subgradient(delta.view(weights[chosen].shape), self.lam)
        self.grads[chosen] = self.grads.get(chosen, 0) + sub.flatten()[self.positions[chosen]]
        for name, g in self.grads.items():
            self.adamw_update(self.values[name], g, self.exp_avg[name], self.exp_avg_sq[name], k, self.lr)
            weights[name].data.view(-1)[self.positions[name]] = self.values[name]  # scatter back
        self.grads.clear()

    def progressive(self) -> None:
        for name in list(self.positions):
            keep = self.progressive_keep(self.values[name], self.theta)
            for state in self.STATES:
                getattr(self, state)[name] = getattr(self, state)[name][keep]
            if not keep.any():  # nothing left to train in this weight
                self.model.get_parameter(name).requires_grad_(False)
                for state in self.STATES:
                    del getattr(self, state)[name]


def theta_scope(model, fraction: float = 0.1) -> dict:
    """Does it matter that θ counts biases and normalisation weights? Measured on ``model``'s parameters.

    ``theta``: the ``fraction`` quantile of |w| over every parameter (SaRA's θ); ``theta_weights_only``: over
    the weight tensors alone (no biases, no normalisation weights); ``bias_share`` / ``norm_share``: the
    share of the selected entries (|w| < θ) that are biases / normalisation weights.
    """
    from ..sara.selection import abs_quantile

    named = dict(model.named_parameters())
    kind = {n: "bias" if n.endswith(".bias") else "norm" if "norm" in n else "weight" for n in named}
    theta = abs_quantile(list(named.values()), fraction)
    selected = {k: 0 for k in ("weight", "bias", "norm")}
    for n, p in named.items():
        selected[kind[n]] += int((p.detach().abs() < theta).sum())
    total = max(sum(selected.values()), 1)
    return {"theta": theta,
            "theta_weights_only": abs_quantile([p for n, p in named.items() if kind[n] == "weight"], fraction),
            "bias_share": selected["bias"] / total, "norm_share": selected["norm"] / total}


def fixed_batches(pipe, dataset, steps: int, batch_size: int = 8, seed: int = 0) -> list[dict]:
    """``steps`` denoising batches drawn once, so two optimizers can be fed exactly the same data.

    Each batch holds the noised images ``x_t``, their timesteps ``t``, the text conditioning
    ``cond`` and the ``noise`` the UNet must predict (the training loop's loss, fixed in advance).
    """
    from diffusers import DDPMScheduler

    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be positive integers, got steps={steps!r}, "
                          f"batch_size={batch_size!r}")
    schedule = DDPMScheduler.from_config(pipe.scheduler_config)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.randint(0, len(dataset), (batch_size,), generator=gen).tolist()
            x0 = torch.stack([dataset[i]["pixel_values"] for i in idx])
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, schedule.config.num_train_timesteps, (batch_size,), generator=gen)
            batches.append({"x_t": schedule.add_noise(x0, noise, t), "t": t, "noise": noise,
                            "cond": pipe.encode([dataset[i]["prompt"] for i in idx])})
    return batches


def denoising_loss(unet, batch: dict) -> torch.Tensor:
    """The training loss on one :func:`fixed_batches` batch, in the UNet's own precision."""
    dtype = next(unet.parameters()).dtype
    pred = unet(batch["x_t"].to(dtype), batch["t"], batch["cond"].to(dtype)).sample
    return torch.nn.functional.mse_loss(pred, batch["noise"].to(dtype))


def max_weight_difference(a, b) -> float:
    """Largest absolute difference between two models' weights of the same names and shapes."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys() or any(pa[n].shape != pb[n].shape for n in pa):
        raise ConfigError("the two models have different weights (names or shapes): compare copies of one model")
    return max(float((pa[n].detach().double() - pb[n].detach().double()).abs().max()) for n in pa)


def mask_figure(model, fraction: float = 0.1):
    """Bar per layer: the share of its entries with |w| below the global θ for ``fraction``.

    What SaRA's mask selects (``SaRA(fraction=...)``); the logic behind notebook
    03's fraction slider.
    """
    from .pruning_thresholds import fraction_below, threshold_for_fraction
    from .weight_distributions import plot_fraction_by_layer

    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"fraction must be strictly between 0 and 1 (0.1 = the smallest 10%), got {fraction!r}")
    theta = threshold_for_fraction(model, fraction)
    overall, table = fraction_below(model, theta)
    total = int(table.numel.sum())
    return plot_fraction_by_layer(
        table, "fraction", reference=overall, reference_label=f"whole UNet: {overall:.1%}",
        title=f"SaRA's mask for fraction {fraction:.0%}: θ = {theta:.2e}, "
              f"{round(overall * total):,} of {total:,} entries train",
        ylabel="share of the layer that trains")


# ------------------------------------------------------------------ the learned update and its spectrum

def weight_update(before, after, name: str) -> torch.Tensor:
    """``ΔW = W_after - W_before`` of one weight as a matrix (a conv kernel becomes out x (in·k·k)).

    This is the matrix the nuclear-norm term ``λ·‖ΔW⊙M‖*`` acts on. SaRA trains
    only masked entries, so ``ΔW`` is already ``ΔW⊙M``.
    """
    w0, w1 = named_weights(before), named_weights(after)
    if name not in w0 or name not in w1:
        known = [n for n in w1 if w1[n].ndim >= 2][:5]
        raise ConfigError(f"no weight {name!r} in both models; matrix weights look like {known}")
    a, b = w0[name], w1[name]
    if a.shape != b.shape:
        raise ConfigError(f"{name} has shape {tuple(a.shape)} before and {tuple(b.shape)} after: not the same model")
    if a.ndim < 2:
        raise ConfigError(f"{name} is a vector {tuple(a.shape)}: it has no singular values; pick a matrix weight")
    delta = b.detach().double().cpu() - a.detach().double().cpu()
    return delta.reshape(delta.shape[0], -1)


def update_spectrum(before, after, name: str) -> np.ndarray:
    """Singular values (descending) of the learned update ``ΔW`` of weight ``name``.

    A low-rank update has a few large singular values and the rest near zero;
    the nuclear norm ``‖ΔW‖*`` is their sum.
    """
    return torch.linalg.svdvals(weight_update(before, after, name)).numpy()


def matrix_weights(model, min_side: int = 2) -> list[str]:
    """Names of the 2-D weights (Linear layers), the ones SaRA's nuclear-norm term acts on."""
    return [n for n, w in named_weights(model).items() if w.ndim == 2 and min(w.shape) >= min_side]


def rank_for_energy(sigma, energy: float = 0.9) -> int:
    """How many of the largest singular values hold ``energy`` of ``Σσ²`` (0 for a zero update)."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ConfigError(f"energy must be a share in (0, 1] (0.9 = 90% of the update's energy), got {energy!r}")
    sigma = np.sort(np.asarray(sigma, dtype=np.float64))[::-1]
    total = float((sigma**2).sum())
    if total == 0:
        return 0
    return int(np.searchsorted(np.cumsum(sigma**2) / total, energy - 1e-12) + 1)


def spectrum_table(before, runs: dict, names=None, energy: float = 0.9) -> pd.DataFrame:
    """Per run and matrix weight: how low-rank is the learned update?

    ``runs``: ``{label: fine-tuned model}``. Columns: ``nuclear_norm`` (Σσ),
    ``frobenius_norm`` (sqrt Σσ²), ``nuclear_over_frobenius`` (between 1 for rank
    one and sqrt(rank) for a flat spectrum: lower means more low-rank, whatever
    the update's size), ``rank_90`` (singular values holding 90% of Σσ²) and
    ``full_rank`` (the smaller side of the matrix). Weights that did not change
    in a run are left out of it.
    """
    if not isinstance(runs, dict) or not runs:
        raise ConfigError("runs must be a non-empty dict {label: fine-tuned model}")
    names = list(names) if names is not None else matrix_weights(before)
    rows = []
    for label, after in runs.items():
        for name in names:
            sigma = update_spectrum(before, after, name)
            fro = float(np.sqrt((sigma**2).sum()))
            if fro == 0:
                continue
            rows.append({"run": label, "name": name, "kind": parameter_kind(name), "nuclear_norm": float(sigma.sum()),
                         "frobenius_norm": fro, "nuclear_over_frobenius": float(sigma.sum()) / fro,
                         "rank_90": rank_for_energy(sigma, energy), "full_rank": len(sigma)})
    return pd.DataFrame(rows, columns=["run", "name", "kind", "nuclear_norm", "frobenius_norm",
                                       "nuclear_over_frobenius", "rank_90", "full_rank"])


def plot_update_spectra(before, runs: dict, name: str | None = None):
    """Two panels comparing runs (e.g. with and without the nuclear-norm term).

    Left: the singular values of ``ΔW`` for one weight ``name`` (default: the
    largest matrix), scaled by the largest, on a log axis. Right: for every
    matrix weight, ``‖ΔW‖* / ‖ΔW‖_F`` (1 = rank one; larger = spread over more
    directions), one box per run.
    """
    import matplotlib.pyplot as plt

    table = spectrum_table(before, runs)
    if table.empty:
        raise ConfigError("no matrix weight changed in any run: train first")
    if name is None:
        sizes = {n: named_weights(before)[n].numel() for n in table.name.unique()}
        name = max(sizes, key=sizes.get)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    colours = plt.get_cmap("tab10")
    for i, (label, after) in enumerate(runs.items()):
        sigma = update_spectrum(before, after, name)
        if sigma[0] > 0:
            left.semilogy(np.arange(1, len(sigma) + 1), sigma / sigma[0], "o-", ms=3, color=colours(i),
                          label=f"{label}: rank_90 = {rank_for_energy(sigma)}, ‖ΔW‖* = {sigma.sum():.3g}")
    left.set_xlabel("singular value index i (largest first)")
    left.set_ylabel("σ_i / σ_1 (log scale)")
    left.set_title(f"Spectrum of the learned update ΔW\n{name}", fontsize=9)
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))  # below: the labels are long
    labels = list(runs)
    data = [table.loc[table.run == label, "nuclear_over_frobenius"].to_numpy() for label in labels]
    box = right.boxplot(data, patch_artist=True)
    right.set_xticks(range(1, len(labels) + 1), [textwrap.fill(label, 16) for label in labels], fontsize=8)
    for patch, i in zip(box["boxes"], range(len(labels))):
        patch.set_facecolor(colours(i))
        patch.set_alpha(0.5)
    for i, values in enumerate(data):
        right.scatter(np.full(len(values), i + 1.0) + np.linspace(-0.12, 0.12, len(values)), values, s=8,
                      color=colours(i), zorder=3)
    right.set_ylabel("‖ΔW‖* / ‖ΔW‖_F\n(1 = rank one; lower = more low-rank)")
    right.set_title(f"Every matrix weight ({len(data[0])} per run)", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ progressive adjustment

def _sara_optimizer(method):
    opt = getattr(method, "optimizer", method)
    if not hasattr(opt, "slots") or not hasattr(opt, "trained_entries"):
        raise ConfigError(f"expected a SaRA method (after training) or a SaRAAdamW, got {type(method).__name__}")
    return opt


def churn_by_kind(churn: pd.DataFrame) -> pd.DataFrame:
    """Progressive adjustment per kind of layer: selected, froze, continue, % froze.

    ``churn``: ``SaRA.churn`` (one row per weight plus ``TOTAL``), the record of
    the re-selection at ``progressive_iter``.
    """
    if churn is None or not {"name", "selected", "froze", "continue"} <= set(churn.columns):
        raise ConfigError("no progressive adjustment happened in this run (churn is empty): train for at least "
                          "2 steps with progressive_iter set (the default is half of training)")
    rows = churn[churn.name != "TOTAL"].assign(kind=lambda d: d.name.map(parameter_kind))
    table = rows.groupby("kind", sort=False)[["selected", "froze", "continue"]].sum()
    table.loc["TOTAL"] = table.sum()
    table["% froze"] = 100 * table.froze / table.selected.clip(lower=1)
    return table


def progressive_summary(before, runs: dict) -> pd.DataFrame:
    """What progressive adjustment did, per SaRA run (``{label: trained SaRA method}``).

    Columns: entries ``selected`` at the start, ``froze`` and ``continued`` at the
    re-selection (0 and all without it), ``trainable at the end``, and, over
    every entry that trained: the share whose ``|w|`` ended at or above its θ
    ("became effective") and the mean ``|Δw|``.
    """
    if not isinstance(runs, dict) or not runs:
        raise ConfigError("runs must be a non-empty dict {label: trained SaRA method}")
    base = named_weights(before)
    rows = []
    for label, method in runs.items():
        opt = _sara_optimizer(method)
        selected = int(opt.selection.total_selected)
        churn = opt.churn
        froze = int(churn.loc[churn.name == "TOTAL", "froze"].iloc[0]) if churn is not None else 0
        above = moved = total = 0
        for slot in opt.slots:
            idx = slot.trained_positions().long().cpu()
            if idx.numel() == 0:
                continue
            now = slot.param.detach().reshape(-1).cpu()[idx].double()
            was = base[slot.name].reshape(-1).cpu()[idx].double()
            above += int((now.abs() >= slot.threshold).sum())
            moved += float((now - was).abs().sum())
            total += idx.numel()
        rows.append({"run": label, "selected": selected, "froze": froze, "continued": selected - froze,
                     "trainable at the end": int(opt.num_trainable) if not opt.detached else selected - froze,
                     "% ended ≥ θ": 100 * above / max(total, 1), "mean |Δw|": moved / max(total, 1)})
    return pd.DataFrame(rows).set_index("run")


def plot_progressive(runs: dict, bins: int = 60):
    """Histogram of ``|w| / θ`` at the end of training over the entries that trained, one per run.

    Entries right of the dashed line (``|w| ≥ θ``) have become "effective";
    with progressive adjustment, those that got there by the re-selection stopped training.
    """
    import matplotlib.pyplot as plt

    if not isinstance(runs, dict) or not runs:
        raise ConfigError("runs must be a non-empty dict {label: trained SaRA method}")
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colours = plt.get_cmap("tab10")
    edges = np.linspace(0, 3, bins + 1)
    for i, (label, method) in enumerate(runs.items()):
        opt = _sara_optimizer(method)
        ratios = []
        for slot in opt.slots:
            idx = slot.trained_positions().long().cpu()
            if idx.numel():
                ratios.append((slot.param.detach().reshape(-1).cpu()[idx].abs() / slot.threshold).numpy())
        values = np.concatenate(ratios) if ratios else np.zeros(0)
        ax.hist(np.clip(values, 0, 3), bins=edges, histtype="step", lw=1.8, color=colours(i),
                label=f"{label}: {100 * (values >= 1).mean() if len(values) else 0:.1f}% end ≥ θ")
    ax.axvline(1, color="k", ls="--", lw=1)
    ax.text(1.02, 0.95, "θ", transform=ax.get_xaxis_transform(), va="top")
    ax.set_yscale("log")
    ax.set_xlabel("|w| / θ at the end of training (entries that trained; values above 3 drawn at 3)")
    ax.set_ylabel("number of entries (log scale)")
    ax.set_title("Where the trained entries ended up, relative to the threshold θ")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ memory: what each byte per entry buys

# Each row adds one option to the previous one: from the exact state (16 bytes per trained entry)
# down to the most compact one.
STATE_OPTIONS = {
    "exact (default)": {},
    "no value copy": {"value_copy": False},
    "+ delta positions": {"value_copy": False, "positions": "delta"},
    "+ bf16 moments (compact=True)": {"compact": True},
    "+ 8-bit moments": {"compact": True, "moments": "8bit"},
}


def state_bytes_table(pipe, dataset, *, options: dict | None = None, fraction: float = 0.1, steps: int = 20,
                      lr: float = 1e-3, batch_size: int = 16, seed: int = 0) -> pd.DataFrame:
    """Train the same SaRA once per state option: bytes kept per trained entry, and what they change.

    ``options``: ``{label: SaRA keyword arguments}`` (default :data:`STATE_OPTIONS`);
    the first row is the reference. Every run starts from a copy of ``pipe`` with
    the same seed and batches. Columns, per trained entry in bytes (counted from
    the optimizer's tensors after step 1, see :func:`sara_edu.sara.footprint.state_bytes`):
    ``values``, ``positions``, ``moments``, ``initial`` (starting values the
    nuclear-norm term needs in 2-D weights) and ``total`` (their sum); then
    ``state (MB)`` for this model (all of the optimizer's state, with the
    positions of frozen entries), ``update vs first (%)``: ``‖W − W_first‖ / ‖W_first − W₀‖``
    after ``steps`` steps (0 = the same weights), and ``final loss`` (mean of the last 5 steps).
    """
    import copy

    from ..sara.footprint import state_bytes
    from ..training.loop import train
    from ..training.sara import SaRA

    options = STATE_OPTIONS if options is None else options
    if not isinstance(options, dict) or not options:
        raise ConfigError("options must be a non-empty dict {label: SaRA keyword arguments}, e.g. "
                          "{'exact': {}, 'compact': {'compact': True}}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    before = torch.cat([p.detach().reshape(-1).cpu() for p in pipe.unet.parameters()])
    rows, weights = [], {}
    for label, kwargs in options.items():
        work = copy.deepcopy(pipe)
        counted = {}

        def count(step, pipe, optimizer, counted=counted):
            if step == 1:
                counted.update(state_bytes(optimizer))

        history = train(work, dataset, SaRA(fraction=fraction, **kwargs), steps=steps, lr=lr,
                        batch_size=batch_size, seed=seed, progress=False, callback=count)
        weights[label] = torch.cat([p.detach().reshape(-1).cpu() for p in work.unet.parameters()])
        n = counted["trained entries"]
        # "total" is the four parts of the entries training now; positions of entries that progressive
        # adjustment froze (if it ran by step 1) are bytes of the model's state, counted in "state (MB)" only.
        rows.append({"option": label, **{part: counted[part] / n for part in ("values", "positions", "moments",
                                                                               "initial")},
                     "total": counted["bytes per entry"],
                     "state (MB)": counted["total"] / MB, "final loss": float(history.loss.tail(5).mean())})
    first = next(iter(weights.values()))
    update = float((first - before).norm())
    for row in rows:
        row["update vs first (%)"] = 100 * float((weights[row["option"]] - first).norm()) / max(update, 1e-30)
    columns = ["option", "values", "positions", "moments", "initial", "total", "state (MB)", "update vs first (%)",
               "final loss"]
    return pd.DataFrame(rows, columns=columns).set_index("option")


def plot_state_bytes(table: pd.DataFrame, title: str = "SaRA's state per trained entry"):
    """Stacked bars of :func:`state_bytes_table`: bytes per trained entry by part, one bar per option."""
    import matplotlib.pyplot as plt

    parts = ["values", "positions", "moments", "initial"]
    if not set(parts + ["total", "update vs first (%)"]) <= set(table.columns):
        raise ConfigError("expected the table of state_bytes_table(...)")
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(table) + 1.5))
    left = np.zeros(len(table))
    colours = plt.get_cmap("tab10")
    for i, part in enumerate(parts):
        ax.barh(table.index, table[part], left=left, color=colours(i), label=part)
        left += table[part].to_numpy()
    for y, (total, diff) in enumerate(zip(table["total"], table["update vs first (%)"])):
        ax.text(total + 0.2, y, f"{total:.1f} B   (update differs by {diff:.2g}%)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.6 * float(table["total"].max()))
    ax.set_xlabel("bytes kept per trained entry, from step to step")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ saving, loading, merging

def file_size_table(files: dict) -> pd.DataFrame:
    """``{label: path}`` -> sizes in MB and as a share of the largest file."""
    if not files:
        raise ConfigError("give at least one file, e.g. {'SaRA sparse file': path}")
    rows = []
    for label, path in files.items():
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{label}: {path} does not exist (save it first)")
        rows.append({"file": label, "path": str(path), "MB": path.stat().st_size / MB})
    table = pd.DataFrame(rows).set_index("file")
    table["% of the largest"] = 100 * table.MB / table.MB.max()
    return table


def plain_model_check(unet) -> pd.Series:
    """Is ``unet`` a plain model again? (no SaRA/selective optimizer, no gradient hooks, no LoRA layers)."""
    from ..sara.attach import MODULE_FLAG, attached_owner
    from ..training.lora import has_lora

    unet = getattr(unet, "unet", unet)
    hooks = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) + len(p._backward_hooks or {})
                for p in unet.parameters())
    checks = {"SaRA optimizer attached": attached_owner(unet) is not None,
              "SaRA mark on the module": MODULE_FLAG in vars(unet),
              "gradient hooks on weights": hooks,
              "LoRA layers": has_lora(unet),
              "parameters": sum(p.numel() for p in unet.parameters()),
              "class": type(unet).__name__}
    return pd.Series(checks, name="value", dtype=object).rename_axis("check")


def max_difference(images_a, images_b) -> float:
    """Largest absolute pixel difference between two image batches (0.0 = identical)."""
    if images_a.shape != images_b.shape:
        raise ConfigError(f"image batches differ in shape: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    return float((images_a.float() - images_b.float()).abs().max()) if images_a.numel() else 0.0


__all__ = ["theta_scope", "mask_figure", "weight_update", "update_spectrum", "matrix_weights", "rank_for_energy", "spectrum_table",
           "plot_update_spectra", "churn_by_kind", "progressive_summary", "plot_progressive", "STATE_OPTIONS",
           "state_bytes_table", "plot_state_bytes", "file_size_table", "plain_model_check", "max_difference"]

