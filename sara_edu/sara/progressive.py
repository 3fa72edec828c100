"""Progressive adjustment: re-select once, part-way through training.

The paper's rule (step 4 of the method): at ``progressive_iter`` (the authors
use half of training), an entry that grew to ``|w| ≥ θ`` has become an
*effective* parameter and freezes with its learned value; an entry still below
``θ`` keeps training. Nothing new joins the trainable set.

The optimizer state follows the entries: continuing entries keep their AdamW
moments (no discontinuity in their statistics), frozen entries' moments are
dropped, which is where the memory of the second half of training shrinks.
With ``reset_moments=True`` the continuing entries restart AdamW instead, as
the authors' release does.
"""
from __future__ import annotations

import torch

from .compact_step import current_values, keep_values
from .moments import keep_entries
from .positions import encode_positions


@torch.no_grad()
def progressive_adjust(optimizer):
    """Freeze the entries of ``optimizer`` (a :class:`SaRAAdamW`) whose ``|w|`` reached their θ.

    Returns a DataFrame per weight: ``selected`` before, ``froze``,
    ``continue``, plus a ``TOTAL`` row (pandas is imported only here, for the report).
    """
    rows = []
    for slot in optimizer.slots:
        n = slot.count
        if n == 0:
            continue
        if optimizer.reset_moments:
            _restart_moments(optimizer, slot)
        keep = current_values(slot, optimizer.value_copy).abs() < slot.threshold
        kept = int(keep.sum())
        rows.append({"name": slot.name, "selected": n, "froze": n - kept, "continue": kept})
        if kept == n:
            continue
        idx = slot.idx
        slot.frozen.append(encode_positions(idx[~keep], slot.param.numel(), slot.positions.kind))
        slot.idx = idx[keep]
        optimizer._clear_grad(slot)  # a SelectedGrad holds the old positions
        keep_values(slot, keep, optimizer.value_copy)
        if slot.initial is not None:
            slot.initial = slot.initial[keep]
        state = optimizer.state.get(slot.values)
        if state:
            keep_entries(state, keep)
        if kept == 0:
            optimizer._unhook(slot)
            slot.param.requires_grad_(False)
    return _churn_table(rows)


def _restart_moments(optimizer, slot) -> None:
    """The authors' variant: the continuing entries start AdamW afresh (zero moments, step 0).

    Emptying the state is enough: torch's AdamW and the compact step both
    create a fresh one at the next step. Done before the filtering below, so
    the frozen entries' moments go too.
    """
    state = optimizer.state.get(slot.values)
    if state:
        state.clear()


def _churn_table(rows):
    import pandas as pd

    df = pd.DataFrame(rows, columns=["name", "selected", "froze", "continue"])
    total = {"name": "TOTAL", "selected": int(df.selected.sum()), "froze": int(df.froze.sum()),
             "continue": int(df["continue"].sum())}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)
