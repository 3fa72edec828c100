"""Looking at generated images: :func:`show_images` draws a grid, :func:`sample_figure` one per digit."""
from __future__ import annotations

from ..errors import ConfigError

#: The widest figure (inches) that JupyterLab's notebook column (about 900 px) shows without shrinking it:
#: a wider one is scaled down, and its 8-9 pt labels become 6-7 px. Every lesson figure fits in it.
COLUMN_WIDTH_IN = 9.0


def to_display(images):
    """(N, 3, H, W) in [-1, 1] (torch or NumPy) -> (N, H, W, 3) float array in [0, 1] for imshow."""
    import numpy as np

    try:
        import torch

        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"expected images shaped (N, 3, H, W) (or (N, 1, H, W)), got {images.shape}")
    images = (images.clip(-1, 1) + 1) / 2
    if images.shape[1] == 1:
        images = images.repeat(3, axis=1)
    return images.transpose(0, 2, 3, 1)


def show_images(images, titles=None, nrow: int | None = None, *, suptitle: str | None = None,
                size: float = 1.1, row_labels=None):
    """Draw generated images on a grid and return the matplotlib Figure.

    ``images``: (N, 3, H, W) in [-1, 1], the format :func:`sara_edu.generate` returns.
    ``nrow``: images per row (default: all in one row, at most 10).
    ``titles``: one short title per image; ``row_labels``: one label per row.
    ``size``: inches per image, reduced when a row would be wider than :data:`COLUMN_WIDTH_IN`.
    """
    import matplotlib.pyplot as plt

    pictures = to_display(images)
    n = len(pictures)
    if n == 0:
        raise ConfigError("show_images got no images")
    if titles is not None and len(titles) != n:
        raise ConfigError(f"got {len(titles)} titles for {n} images; give one title per image")
    per_row = int(nrow or min(n, 10))
    if per_row < 1:
        raise ConfigError(f"nrow must be >= 1, got {nrow}")
    rows = -(-n // per_row)
    if row_labels is not None and len(row_labels) != rows:
        raise ConfigError(f"got {len(row_labels)} row labels for {rows} rows")
    label_room = 1.2 if row_labels else 0
    size = min(size, (COLUMN_WIDTH_IN - label_room) / per_row)  # many per row: smaller tiles, not a wider figure
    fig, axes = plt.subplots(rows, per_row, figsize=(size * per_row + label_room, size * rows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < n:
            ax.imshow(pictures[i], interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=8)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            axes[r, 0].set_ylabel(str(label), fontsize=9, rotation=0, ha="right", va="center")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def sample_figure(pipe, *, style: str | None = None, digits=range(10), n_per_digit: int = 1, seed: int = 0,
                  steps: int = 25, guidance_scale: float = 3.0, title: str | None = None):
    """Generate ``n_per_digit`` samples for each digit (one column per digit) and draw them.

    Same arguments as :func:`sara_edu.generate`, so the figure is reproducible from
    the seed; the logic behind the sampling sliders of the notebooks.
    """
    from ..world.model import generate
    from ..world.text import make_prompt

    digits = list(digits)
    if n_per_digit < 1 or not digits:
        raise ConfigError(f"need at least one digit and n_per_digit >= 1, got {digits} and {n_per_digit}")
    prompts = [make_prompt(d, style) for _ in range(n_per_digit) for d in digits]
    images = generate(pipe, prompts, steps=steps, seed=seed, guidance_scale=guidance_scale)
    where = f"'{style}' style" if style else "plain digits"
    return show_images(images, titles=[f"'{d}'" for d in digits] + [""] * (len(prompts) - len(digits)),
                       nrow=len(digits),
                       suptitle=title or f"{where}: {steps} DDIM steps, guidance {guidance_scale:g}, seeds {seed}..."
                                         f"{seed + len(prompts) - 1}")
