"""SaRA, the method: what a practitioner lifts into their own training script.

It needs only torch and safetensors (pandas is imported lazily, for reports)::

    from sara_edu.sara import SaRAAdamW, save_sparse
    optimizer = SaRAAdamW(unet, lr=1e-4, threshold=2e-3, progressive_iter=total_steps // 2)
    ...                                   # the rest of the loop is unchanged
    save_sparse(optimizer, "style.safetensors")

One idea per module: :mod:`.selection` (which entries train), :mod:`.optimizer`
(unstructured backpropagation), :mod:`.nuclear` (the low-rank penalty),
:mod:`.progressive` (re-selection part-way), :mod:`.sparse_file` (tiny files),
:mod:`.attach` (leaving a plain model behind), :mod:`.grad` (the gradient a
trained weight shows the loop: only its selected entries), :mod:`.distributed`
(several processes: how to prepare model and optimizer, what SaRA all-reduces);
the compact state options: :mod:`.positions`, :mod:`.moments`,
:mod:`.compact_step` and :mod:`.footprint` (bytes kept per trained entry)::

    optimizer = SaRAAdamW(unet, lr=1e-4, compact=True)   # ~5.6 instead of ~16.6 bytes per trained entry

and how the step runs: :mod:`.fused_step` (``compiled=True``: one generated kernel per weight) and the
per-layer mode, :mod:`.in_backward` (``step_in_backward=True``: each weight updated inside backward, no selected
gradients kept), and :mod:`.cuda_graph` (``cuda_graphs=True``: the exact step replayed as one CUDA graph).
"""
from .attach import attached_owner, detach, merge
from .footprint import state_bytes
from .grad import SelectedGrad
from .nuclear import nuclear_norm_grad, nuclear_norm_penalty
from .optimizer import SaRAAdamW
from .progressive import progressive_adjust
from .selection import Selection, select_parameters
from .sparse_file import SPARSE_FORMAT, load_sparse, save_sparse

__all__ = ["SaRAAdamW", "Selection", "select_parameters", "nuclear_norm_grad", "nuclear_norm_penalty",
           "progressive_adjust", "save_sparse", "load_sparse", "SPARSE_FORMAT", "detach", "merge",
           "attached_owner", "SelectedGrad", "state_bytes"]
