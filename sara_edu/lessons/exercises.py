"""Graded exercises for notebook 03: each piece of SaRA a learner writes, checked against the library.

Each ``check_*`` runs the learner's function on small cases chosen to catch the
usual mistakes, compares with the library's answer and returns a
:class:`Verdict` that says which piece is wrong and how (``✓``/``✗`` and one
sentence). :func:`ready` tells the notebook whether all five pieces pass, so
the equality check against ``SaRAAdamW`` runs only then.

The notebook the learner opens is made from the solved one
(``notebooks/solutions/03_sara_step_by_step.ipynb``) by :func:`strip_solutions`:
every block between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` becomes
``raise NotImplementedError(...)``. ``python -m sara_edu.lessons.exercises``
writes it; a test checks the two stay in step.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
TODO = 'raise NotImplementedError("write this piece (see the text above), then run the cell")'


@dataclass(frozen=True)
class Verdict:
    """One piece's result: ``ok`` and what to fix (printed as ✓/✗ and the piece's name)."""

    piece: str
    ok: bool
    message: str

    def __str__(self) -> str:
        return f"{'✓' if self.ok else '✗'} {self.piece}: {self.message}"

    def _repr_pretty_(self, p, cycle):  # a notebook cell that ends with a check shows the sentence, not a repr
        p.text(str(self))

    def __bool__(self) -> bool:
        return self.ok


def _run(piece: str, fn, *args, returns: bool = True):
    """``fn(*args)``, or the Verdict that says why it could not run (``returns``: the piece must return a value)."""
    try:
        out = fn(*args)
    except NotImplementedError:
        return None, Verdict(piece, False, "not written yet: replace the `raise NotImplementedError` line")
    except Exception as error:  # a learner's bug: say what it raised
        return None, Verdict(piece, False, f"raised {type(error).__name__}: {error}")
    if out is None and returns:
        return None, Verdict(piece, False, "returned None: end the function with a return statement")
    return out, None


def _case_weight() -> tuple[torch.Tensor, float]:
    """A 4x5 weight with entries below, at and above θ = 0.1, of both signs (ties at θ are not selected)."""
    w = torch.tensor([[0.05, -0.05, 0.1, -0.1, 0.3], [0.0, 0.2, -0.09, 0.11, -0.5],
                      [0.099, -0.2, 0.01, 0.15, 0.1], [-0.0, 0.7, -0.101, 0.02, 0.4]], dtype=torch.float64)
    return w, 0.1


def check_mask(select_mask) -> Verdict:
    """``select_mask(weight, theta)`` -> sorted flat positions of the entries with ``|w| < θ`` (1-D, integer)."""
    from ..sara.selection import select_parameters

    piece = "1. the mask"
    w, theta = _case_weight()
    got, failed = _run(piece, select_mask, w.clone(), theta)
    if failed is not None:
        return failed
    layer = torch.nn.Linear(5, 4, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    want = select_parameters(layer, threshold=theta).indices["weight"].long()
    got = torch.as_tensor(got)
    if got.dtype.is_floating_point or got.dtype == torch.bool:
        return Verdict(piece, False, f"return positions (integers), not {got.dtype} values or a boolean mask: "
                                     "flatten, then .nonzero()")
    if got.ndim != 1:
        return Verdict(piece, False, f"return a 1-D tensor of flat positions, got shape {tuple(got.shape)}: "
                                     "flatten the weight first")
    got = got.long()
    if set(got.tolist()) == set(want.tolist()):
        if not torch.equal(got, want):
            return Verdict(piece, False, "the right positions, but not in increasing order")
        return Verdict(piece, True, f"{len(want)} of {w.numel()} entries, as the library selects them")
    flat, chosen, right = w.flatten(), set(got.tolist()), set(want.tolist())
    if any(flat[i] < -theta for i in chosen if 0 <= i < len(flat)):
        return Verdict(piece, False, "large negative weights are selected: compare the magnitude |w|, not w")
    if chosen > right and all(flat[i].abs() == theta for i in chosen - right):
        return Verdict(piece, False, "entries with |w| exactly θ are selected: the rule is |w| < θ (strict)")
    return Verdict(piece, False, f"selected {sorted(got.tolist())}, the library {want.tolist()}")


def check_keep_selected(keep_selected) -> Verdict:
    """``keep_selected(grad, positions)`` -> the 1-D vector ``grad.flatten()[positions]``."""
    piece = "2. the gradient hook"
    g = torch.arange(20, dtype=torch.float64).view(4, 5) - 7.5
    positions = torch.tensor([0, 3, 6, 11, 19])
    got, failed = _run(piece, keep_selected, g.clone(), positions)
    if failed is not None:
        return failed
    want = g.flatten()[positions]
    got = torch.as_tensor(got)
    if got.shape == g.shape:
        return Verdict(piece, False, "returned a dense gradient: keep only the selected entries, a 1-D vector "
                                     "(that is the memory unstructured backpropagation saves)")
    if got.shape != want.shape:
        return Verdict(piece, False, f"expected {len(positions)} values (one per position), got shape "
                                     f"{tuple(got.shape)}")
    if torch.equal(got, g.view(-1)[: len(positions)]):
        return Verdict(piece, False, "returned the first entries, not the selected ones: index with positions")
    if not torch.equal(got, want):
        return Verdict(piece, False, "values differ from grad.flatten()[positions]: flatten row-major (view(-1))")
    return Verdict(piece, True, "keeps g[M] as a 1-D vector")


def check_nuclear_subgradient(nuclear_subgradient) -> Verdict:
    """``nuclear_subgradient(delta, lam)`` -> ``lam * U @ Vh`` over the singular values > 0 (a matrix)."""
    from ..sara.nuclear import nuclear_norm_grad

    piece = "3. the nuclear-norm subgradient"
    gen = torch.Generator().manual_seed(0)
    full_rank = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    rank_two = torch.randn(6, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 4, generator=gen,
                                                                                     dtype=torch.float64)
    lam = 5e-4
    for name, delta in (("a full-rank 6x4 matrix", full_rank), ("a rank-2 6x4 matrix", rank_two)):
        got, failed = _run(piece, nuclear_subgradient, delta.clone(), lam)
        if failed is not None:
            return failed
        got = torch.as_tensor(got, dtype=torch.float64)
        want = lam * nuclear_norm_grad(delta, method="svd")[0]
        if got.shape != want.shape:
            return Verdict(piece, False, f"on {name}: expected a {tuple(want.shape)} matrix, got {tuple(got.shape)}: "
                                         "use full_matrices=False")
        if torch.allclose(got, want / lam, rtol=1e-6, atol=1e-9):
            return Verdict(piece, False, "missing the factor λ: the gradient of λ·‖X‖* is λ·U·Vᵀ")
        if not torch.allclose(got, want, rtol=1e-6, atol=1e-12):
            hint = ("directions with σ = 0 must be dropped (they have no unique U, V): keep σ > σ_max·tolerance"
                    if name.startswith("a rank-2") else "expected λ·U·Vᵀ from torch.linalg.svd(delta)")
            return Verdict(piece, False, f"on {name}: {hint}")
    return Verdict(piece, True, "λ·U·Vᵀ over the directions with σ > 0, as the library's")


def check_adamw_update(adamw_update) -> Verdict:
    """``adamw_update(value, grad, exp_avg, exp_avg_sq, step, lr, wd, b1, b2, eps)`` updates the three 1-D
    tensors in place, as ``torch.optim.AdamW`` does (decoupled decay, bias correction)."""
    piece = "4. masked AdamW"
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(7, generator=gen, dtype=torch.float64)
    grads = [torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(3)]
    lr, wd, b1, b2, eps = 1e-2, 1e-2, 0.9, 0.999, 1e-8
    reference = torch.nn.Parameter(start.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    value, m, v = start.clone(), torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for k, g in enumerate(grads, 1):
        reference.grad = g.clone()
        torch_adamw.step()
        _, failed = _run(piece, adamw_update, value, g.clone(), m, v, k, lr, wd, b1, b2, eps,
                         returns=False)  # AdamW works in place
        if failed is not None:
            return failed
        if torch.allclose(value, reference.detach(), rtol=0, atol=1e-12):
            continue
        if torch.equal(value, start) and k == 1:
            return Verdict(piece, False, "the value did not change: update value, exp_avg and exp_avg_sq in place "
                                         "(mul_, lerp_, addcmul_, addcdiv_), do not rebind the names")
        hint = _adamw_hint(start, grads[:k], lr, wd, b1, b2, eps, value)
        return Verdict(piece, False, f"differs from torch.optim.AdamW at step {k}: {hint}")
    return Verdict(piece, True, "3 steps equal torch.optim.AdamW's to 1e-12")


def _adamw_hint(start, grads, lr, wd, b1, b2, eps, got) -> str:
    """Which common slip reproduces the learner's value: name it."""
    def run(decay_first=True, correct=True, decay=True):
        w, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
        for k, g in enumerate(grads, 1):
            if decay and decay_first:
                w = w * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            mh, vh = (m / (1 - b1 ** k), v / (1 - b2 ** k)) if correct else (m, v)
            w = w - lr * mh / (vh.sqrt() + eps)
            if decay and not decay_first:
                w = w - lr * wd * w
        return w

    for text, kw in (("no bias correction: divide m by (1 − β₁ᵏ) and v by (1 − β₂ᵏ)", {"correct": False}),
                     ("no weight decay: multiply the value by (1 − lr·wd) first", {"decay": False}),
                     ("weight decay after the Adam step: AdamW decays the value before it", {"decay_first": False})):
        if torch.allclose(got, run(**kw), rtol=0, atol=1e-12):
            return text
    return "check each line against the formulas above (m, v, their bias correction, the step)"


def check_progressive(progressive_keep) -> Verdict:
    """``progressive_keep(values, theta)`` -> a boolean mask of the entries that go on training (``|v| < θ``)."""
    piece = "5. progressive adjustment"
    values = torch.tensor([0.05, -0.05, 0.1, -0.12, 0.2, 0.0, 0.099, -0.1], dtype=torch.float64)
    got, failed = _run(piece, progressive_keep, values.clone(), 0.1)
    if failed is not None:
        return failed
    want = values.abs() < 0.1
    got = torch.as_tensor(got)
    if got.dtype != torch.bool or got.shape != want.shape:
        return Verdict(piece, False, f"return one bool per value (shape {tuple(want.shape)}), got {got.dtype} "
                                     f"{tuple(got.shape)}")
    if torch.equal(got, ~want):
        return Verdict(piece, False, "inverted: True must mark the entries that go on training, |v| < θ; those "
                                     "that grew to θ freeze")
    if torch.equal(got, values < 0.1):
        return Verdict(piece, False, "compare |v| with θ: a value of −0.12 has grown past θ too")
    if torch.equal(got, values.abs() <= 0.1):
        return Verdict(piece, False, "an entry exactly at θ has grown to θ and freezes: use |v| < θ")
    if not torch.equal(got, want):
        return Verdict(piece, False, f"kept {got.tolist()}, expected {want.tolist()}")
    return Verdict(piece, True, "the entries below θ go on, the rest freeze")


CHECKS = {"select_mask": check_mask, "keep_selected": check_keep_selected,
          "nuclear_subgradient": check_nuclear_subgradient, "adamw_update": check_adamw_update,
          "progressive_keep": check_progressive}


def report(checks: dict, pieces: dict, waiting: str) -> bool:
    """Run ``checks[name](fn)`` for every piece; print the verdicts (and ``waiting`` unless all pass)."""
    missing = sorted(set(checks) - set(pieces))
    if missing:
        raise TypeError(f"ready() needs all {len(checks)} pieces; missing {missing}")
    unknown = sorted(set(pieces) - set(checks))
    if unknown:
        raise TypeError(f"ready() got unknown piece(s) {unknown}; the pieces are {sorted(checks)}")
    verdicts = [checks[name](fn) for name, fn in pieces.items()]
    for v in verdicts:
        print(v)
    if not all(verdicts):
        print(waiting)
    return all(verdicts)


def ready(**pieces) -> bool:
    """Check every piece (by the names of :data:`CHECKS`); print the verdicts; True when all pass."""
    return report(CHECKS, pieces, "The equality check runs once all five pieces pass (the ✗ lines say what to fix).")


def strip_solutions(source: str) -> str:
    """The learner's version of a cell: each ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block becomes one
    ``raise NotImplementedError`` line at the block's indentation."""
    pattern = re.compile(rf"^([ \t]*){re.escape(BEGIN)}[^\n]*\n.*?^[ \t]*{re.escape(END)}[^\n]*$", re.S | re.M)
    return pattern.sub(lambda m: f"{m.group(1)}{TODO}", source)


def learner_notebook(solved: Path) -> dict:
    """The notebook a learner opens: ``solved`` with its solution blocks stripped and no outputs."""
    nb = json.loads(Path(solved).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            text = strip_solutions("".join(cell["source"]))
            lines = text.split("\n")
            cell["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
            cell["outputs"], cell["execution_count"] = [], None
    return nb


def main(argv=None) -> None:
    import argparse

    from ..io import atomic_write_bytes

    parser = argparse.ArgumentParser(prog="python -m sara_edu.lessons.exercises",
                                     description="Write a learner's notebook from its solved version.")
    parser.add_argument("solved", help="e.g. notebooks/solutions/03_sara_step_by_step.ipynb")
    parser.add_argument("learner", help="e.g. notebooks/03_sara_step_by_step.ipynb")
    args = parser.parse_args(argv)
    text = json.dumps(learner_notebook(Path(args.solved)), indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(args.learner, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.learner}")


if __name__ == "__main__":
    main()
