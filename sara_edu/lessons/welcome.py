"""Notebook 00 (welcome): the course's "SaRA in one picture"."""
from __future__ import annotations

from ..errors import ConfigError


def sara_overview_figure(weight=None, *, fraction: float = 0.25, theta: float | None = None, theta_from: str = "",
                         grow: float = 0.35, size: int = 12, seed: int = 0):
    """SaRA in one picture: four panels on one small weight matrix.

    1. the pretrained weights, with the smallest ``fraction`` of |w| (below θ) outlined;
    2. the sparse trainable mask M = (|w| < θ): only those entries get gradients;
    3. progressive adjustment: after some training a share (``grow``) of the trained
       entries has grown past θ and is frozen; the rest keeps training;
    4. the merged result W + ΔW⊙M: an ordinary dense matrix of the same shape, so the
       fine-tuned model is a plain model, and only the trained values need saving.

    ``weight``: any 2-D (or conv) tensor, e.g. a layer of the shipped model; a
    ``size`` x ``size`` corner is shown. Without it a random matrix stands in.
    ``theta``: SaRA's θ as SaRA sets it, one value for the whole model (e.g. the 10%
    quantile of |w| over every UNet parameter; ``theta_from`` says so in the title);
    without it θ is the ``fraction`` quantile of the corner itself, a toy θ.
    The "training" in panels 3-4 is simulated with seeded random updates:
    the figure explains the mechanism, it is not a training result.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be between 0 and 1, got {fraction}")
    if theta is not None and not (isinstance(theta, (int, float)) and theta > 0):
        raise ConfigError(f"theta must be a positive number (SaRA's |w| < θ), got {theta!r}")
    rng = np.random.default_rng(seed)
    if weight is None:
        w = rng.standard_normal((size, size)) * 0.05
    else:
        import torch

        w = torch.as_tensor(weight).detach().float().cpu().reshape(len(weight), -1).numpy()
        if w.shape[0] < size or w.shape[1] < size:
            raise ConfigError(f"weight {w.shape} is smaller than the {size}x{size} crop; pass a bigger layer or smaller size")
        w = w[:size, :size]
    given = theta is not None
    theta = float(theta) if given else float(np.quantile(np.abs(w), fraction))
    mask = np.abs(w) < theta
    if not mask.any():
        raise ConfigError(f"no entry of this {size}x{size} corner is below θ = {theta:.3g}: pick another layer")
    # simulated training: trainable entries move; some end up above θ
    delta = np.zeros_like(w)
    trained = np.flatnonzero(mask)
    grew = rng.choice(trained, size=max(1, int(round(grow * len(trained)))), replace=False)
    delta.flat[trained] = rng.standard_normal(len(trained)) * theta * 0.3
    delta.flat[grew] = np.sign(rng.standard_normal(len(grew))) * theta * rng.uniform(1.3, 2.5, len(grew))
    merged = w + delta * mask
    state = np.zeros_like(w, dtype=int)  # 0 frozen from the start, 1 keeps training, 2 grew past θ -> frozen
    state[mask] = 1
    state[mask & (np.abs(merged) >= theta)] = 2

    # 2 x 2, not 1 x 4: four panels in a row would be wider than the notebook column (display.COLUMN_WIDTH_IN)
    fig, axes = plt.subplots(2, 2, figsize=(8.4, 7.2))
    axes = axes.flatten()
    vmax = float(np.abs(w).max())
    ax = axes[0]
    im = ax.imshow(np.abs(w), cmap="Greys", vmin=0, vmax=vmax)
    ys, xs = np.nonzero(mask)
    ax.scatter(xs, ys, s=60, facecolors="none", edgecolors="tab:red", linewidths=1.2)
    circled = f"|w| < θ = {theta:.2g}" + (f"\n({theta_from})" if theta_from else "") if given else \
        f"smallest {fraction:.0%} (|w| < θ = {theta:.2g})"
    ax.set_title(f"1. pretrained |w|\nred: {circled}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="|w| (weight units)")
    ax = axes[1]
    ax.imshow(mask, cmap=ListedColormap(["#dddddd", "tab:red"]), vmin=0, vmax=1)
    ax.set_title(f"2. sparse trainable mask M\n{mask.sum()} of {mask.size} entries train", fontsize=9)
    ax = axes[2]
    ax.imshow(state, cmap=ListedColormap(["#dddddd", "tab:red", "tab:blue"]), vmin=0, vmax=2)
    ax.set_title("3. progressive adjustment\nred: still < θ, keeps training;\nblue: grew past θ, now frozen",
                 fontsize=9)
    ax = axes[3]
    im = ax.imshow(merged, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.scatter(xs, ys, s=6, color="k")  # the entries that changed: the only ones saved
    ax.set_title(f"4. merged W + ΔW⊙M: a plain matrix\nsaved: only the {mask.sum()} trained values (dots)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="w (weight units)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("input index")
    for ax in axes[::2]:  # the left column
        ax.set_ylabel("output index")
    fig.suptitle("SaRA in one picture:\ntrain the weights that pretraining left (temporarily) ineffective", fontsize=11)
    fig.tight_layout()
    return fig
