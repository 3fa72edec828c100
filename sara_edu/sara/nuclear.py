"""The low-rank part of SaRA: the nuclear norm ``λ·‖ΔW⊙M‖*`` and its subgradient.

We penalise the *update* ``ΔW⊙M`` (trained values minus their initial values,
zero off the mask), which is what the paper's equation writes. The authors'
release penalises ``W⊙M`` (the selected values themselves); with small
selected values the two differ by the (small) initial part. :class:`SaRAAdamW`
applies it to one randomly chosen eligible 2-D weight per step (as the
authors do), adding ``λ·U·Vᵀ`` to that weight's gradient inside ``step()``.
Which weights, and ``ΔW⊙M`` or ``W⊙M``, are options (``nuclear_targets``,
``nuclear_of``): by default 2-D weights only, as the authors' filter keeps
only matrices, so convolutions never meet the term; ``"conv"`` reads a
convolution as its ``out × (in·kh·kw)`` matrix.

Cost: ``U·Vᵀ`` comes from an eigendecomposition of the small side's Gram
matrix, in float64 (:func:`nuclear_norm_grad` says why), instead of a full
SVD. On an SD1.5-sized UNet (184 eligible matrices, 10%-dense ΔW), one torch
thread of the shared 2-core CPU, process time: one matrix takes 0.04 s
(320×320) to 6.0 s (10240×1280), 1.1 s on average, about 15% of a plain
forward+backward step at batch 1 of 32×32 latents (7.0 s) and less at larger
batches (the Gram matrix in float32 took 0.5 s on average, but dropped
σ < 3.5e-4·σ_max). ``nuclear_every`` and ``nuclear_max_numel`` cut it further.
The optimizer reads ``U·Vᵀ`` at its trained entries only (:func:`nuclear_norm_grad_at`),
piece by piece, so beyond the dense ``ΔW⊙M`` the term's transients are the
small side's n×n matrices and one piece of rows at a time.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .attach import optimizer_of
from .positions import entry_bounds


def nuclear_norm_grad(delta: torch.Tensor, method: str = "gram") -> tuple[torch.Tensor, float]:
    """``(U·Vᵀ, ‖delta‖*)``: the (sub)gradient and value of the nuclear norm of a matrix.

    ``method="svd"`` uses ``torch.linalg.svd(full_matrices=False)`` in the
    matrix's precision (float32 for half-precision weights) and drops the
    directions below the usual rank tolerance ``eps·max(m, n)·σ_max``. The
    default ``"gram"`` is the same quantity computed from the small side's Gram
    matrix: with ``A`` the tall orientation (m ≥ n), ``AᵀA = VΣ²Vᵀ`` (an n×n
    ``eigh``) and ``U·Vᵀ = A·V·Σ⁻¹·Vᵀ``. Squaring loses half the digits, so it
    runs in float64 whatever the weights' dtype: directions with
    ``σ ≥ sqrt(eps₆₄)·σ_max ≈ 1.5e-8·σ_max`` are kept (measured against
    autograd of ``torch.linalg.matrix_norm(ord="nuc")`` in float64: 5e-6
    relative difference on a float32 1280×1280 matrix with σ spread down to
    1e-6·σ_max, and 3e-8 on a 10%-dense random one, where the Gram matrix in
    float32, which drops σ < 3.5e-4·σ_max, was 65% and 2.8% off). Directions
    below that are left out (their part of ``U·Vᵀ`` is 0): for float32 weights
    they are below what the weights resolve at all (rounding each entry to
    float32, by up to 6e-8 of itself, can move singular values by 6e-8·‖delta‖_F
    ≥ 6e-8·σ_max); for float64 weights ``"svd"`` resolves them. A zero
    ``delta`` (the first step) gives 0. It costs two matmuls plus an n×n eigensolver, in float64 about twice the
    float32 time and still less than a float64 SVD. Where the eigensolver fails
    to converge (cuSOLVER can, on a nearly all-zero Gram matrix), it falls back
    to the SVD.
    """
    work = delta.to(torch.float32) if delta.dtype in (torch.float16, torch.bfloat16) else delta
    if method == "svd":
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        keep = S > S.max() * torch.finfo(work.dtype).eps * max(work.shape)
        G = U[:, keep] @ Vh[keep]
        return G.to(delta.dtype), float(S.sum())
    if method != "gram":
        raise ConfigError(f"nuclear method must be 'gram' or 'svd', got {method!r}")
    tall = work.shape[0] >= work.shape[1]
    A = (work if tall else work.T).to(torch.float64)  # the Gram matrix squares σ: float32 would keep 3.5e-4·σ_max
    try:
        P, nuc = _gram_inverse_root(A.T @ A)
    except torch.linalg.LinAlgError:
        # cuSOLVER's eigensolver can fail to converge on such a Gram matrix: seen on an H100 early in a run,
        # when ΔW⊙M is tiny and mostly zero (benchmarks/results/gpu_h100/). The SVD gives the same quantity.
        return nuclear_norm_grad(delta, "svd")
    if P is None:
        return torch.zeros_like(delta), 0.0
    G = A @ P  # P is only n×n: forming it first makes the m-sized work a single matmul
    G = G if tall else G.T
    return G.to(delta.dtype), nuc


def _gram_inverse_root(gram: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """``(V·Σ⁻¹·Vᵀ, Σσ)`` from a float64 Gram matrix ``AᵀA = VΣ²Vᵀ``, so that ``U·Vᵀ = A·V·Σ⁻¹·Vᵀ``.

    Directions with ``σ < sqrt(eps₆₄)·σ_max`` are left out (see :func:`nuclear_norm_grad`); ``(None, 0.0)``
    if none is kept (a zero matrix). Raises ``torch.linalg.LinAlgError`` where the eigensolver fails.
    """
    evals, V = torch.linalg.eigh(gram)
    sigma = evals.clamp_min(0).sqrt()
    smax = sigma.max() if sigma.numel() else sigma.new_zeros(())
    keep = sigma > smax * math.sqrt(torch.finfo(torch.float64).eps)
    if not bool(keep.any()):
        return None, 0.0
    Vk = V[:, keep]
    return (Vk / sigma[keep]) @ Vk.T, float(sigma[keep].sum())


# Rows (of the tall orientation) per piece in nuclear_norm_grad_at: one piece in float64 is n x 1024
NUCLEAR_PIECE_ROWS = 1024


def nuclear_norm_grad_at(delta: torch.Tensor, positions: torch.Tensor,
                         method: str = "gram") -> tuple[torch.Tensor, float]:
    """``(U·Vᵀ at positions, ‖delta‖*)``: :func:`nuclear_norm_grad` read at flat (row-major) ``positions`` only.

    SaRA needs the subgradient at its trained entries only, so the default
    ``"gram"`` method never forms ``U·Vᵀ``, nor ``delta`` in float64, in full:
    the Gram matrix is summed piece by piece over :data:`NUCLEAR_PIECE_ROWS`
    rows, and ``U·Vᵀ = A·(V·Σ⁻¹·Vᵀ)`` is computed a piece at a time and read at
    the positions in it: the transients are the small side's n×n matrices and
    one piece at a time (``tests/sara/test_optimizer.py`` bounds them). The sums run
    in another order than one matmul's, so the result can differ from
    :func:`nuclear_norm_grad` in the last bits of float64 (then rounded to the
    weights' dtype). ``"svd"`` reads the full result.
    """
    if method != "gram":
        G, nuc = nuclear_norm_grad(delta, method)
        return G.reshape(-1).index_select(0, positions.long()), nuc
    work = delta.to(torch.float32) if delta.dtype in (torch.float16, torch.bfloat16) else delta
    rows, cols = work.shape
    tall = rows >= cols
    A = work if tall else work.T  # a view: pieces of it are copied to float64 one at a time
    pieces = [slice(s, s + NUCLEAR_PIECE_ROWS) for s in range(0, A.shape[0], NUCLEAR_PIECE_ROWS)]
    gram = torch.zeros(A.shape[1], A.shape[1], dtype=torch.float64, device=A.device)
    for part in pieces:
        a = A[part].to(torch.float64)
        gram.addmm_(a.T, a)
    try:
        P, nuc = _gram_inverse_root(gram)
    except torch.linalg.LinAlgError:  # as in nuclear_norm_grad: cuSOLVER can fail on such a Gram matrix
        G, nuc = nuclear_norm_grad(delta, "svd")
        return G.reshape(-1).index_select(0, positions.long()), nuc
    out = torch.zeros(positions.numel(), dtype=delta.dtype, device=delta.device)
    if P is None:
        return out, 0.0
    positions = positions.long()
    if tall:  # pieces of delta's rows: their positions are one sorted run
        bounds = entry_bounds(positions, [p.start * cols for p in pieces] + [rows * cols])
        for part, lo, hi in zip(pieces, bounds, bounds[1:]):
            if hi > lo:
                g = A[part].to(torch.float64) @ P
                out[lo:hi] = g.reshape(-1).index_select(0, positions[lo:hi] - part.start * cols).to(out.dtype)
    else:  # pieces of delta's columns (A's rows): pick the positions in them
        r, c = positions // cols, positions % cols
        for part in pieces:
            inside = ((c >= part.start) & (c < part.start + NUCLEAR_PIECE_ROWS)).nonzero().reshape(-1)
            if inside.numel():
                g = P @ A[part].to(torch.float64).T  # delta's columns of this piece, all its rows
                out[inside] = g[r[inside], c[inside] - part.start].to(out.dtype)
    return out, nuc


def nuclear_norm_penalty(obj, rank_lambda: float | None = None, per_layer: bool = False):
    """``λ·‖ΔW⊙M‖*`` for logging and notebooks.

    ``obj`` is a matrix (then ``λ`` defaults to 1) or a :class:`SaRAAdamW` /
    :class:`SaRA` (then ``λ`` defaults to its ``rank_lambda`` and the value is
    summed over every weight the term may pick (its ``nuclear_targets``, of the
    matrix its ``nuclear_of`` names), with exact singular values; a
    DataFrame per layer with ``per_layer=True``). Costs one SVD per matrix.
    """
    if isinstance(obj, torch.Tensor):
        lam = 1.0 if rank_lambda is None else rank_lambda
        return lam * float(torch.linalg.matrix_norm(obj.detach().float(), "nuc"))
    opt = optimizer_of(obj)
    lam = opt.rank_lambda if rank_lambda is None else rank_lambda
    rows = []
    for slot in opt.eligible_for_nuclear():
        nuc = float(torch.linalg.matrix_norm(opt._delta(slot).float(), "nuc"))
        rows.append({"name": slot.name, "nuclear_norm": nuc, "penalty": lam * nuc})
    if not per_layer:
        return sum(r["penalty"] for r in rows)
    import pandas as pd

    return pd.DataFrame(rows, columns=["name", "nuclear_norm", "penalty"])
