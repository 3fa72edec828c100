"""Progressive adjustment: re-select once, part-way through training.

The paper's rule (step 4 of the method): at ``progressive_iter`` (the authors
use half of training), an entry that grew to ``|w| ≥ θ`` has become an
*effective* parameter and freezes with its learned value; an entry still below
``θ`` keeps training. Nothing new joins the trainable set.

The optimizer state follows the entries: continuing entries keep their AdamW
moments (no discontinuity in their statistics), frozen entries' moments are
dropped, which is where the memory of the second half of training shrinks.
"""
from __future__ import annotations

import torch

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@torch.no_grad()
def progressive_adjust(optimizer):
    """Freeze the entries of ``optimizer`` (a :class:`SaRAAdamW`) whose ``|w|`` reached their θ.

    Returns a DataFrame per weight: ``selected`` before, ``froze``,
    ``continue``, plus a ``TOTAL`` row (pandas is imported only here, for the report).
    """
    rows = []
    for slot in optimizer.slots:
        n = int(slot.idx.numel())
        if n == 0:
            continue
        keep = slot.values.detach().abs() < slot.threshold
        kept = int(keep.sum())
        rows.append({"name": slot.name, "selected": n, "froze": n - kept, "continue": kept})
        if kept == n:
            continue
        slot.frozen.append(slot.idx[~keep])
        slot.idx = slot.idx[keep]
        optimizer._clear_grad(slot)  # a SelectedGrad holds the old positions
        slot.values.data = slot.values.data[keep]
        if slot.initial is not None:
            slot.initial = slot.initial[keep]
        state = optimizer.state.get(slot.values)
        for key in _MOMENT_KEYS:
            if state and key in state:
                state[key] = state[key][keep]
        if kept == 0:
            optimizer._unhook(slot)
            slot.param.requires_grad_(False)
    return _churn_table(rows)


def _churn_table(rows):
    import pandas as pd

    df = pd.DataFrame(rows, columns=["name", "selected", "froze", "continue"])
    total = {"name": "TOTAL", "selected": int(df.selected.sum()), "froze": int(df.froze.sum()),
             "continue": int(df["continue"].sum())}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)
