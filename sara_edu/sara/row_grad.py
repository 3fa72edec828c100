"""The per-layer mode's large weights: their gradient made a block of rows at a time, never whole.

In the per-layer mode (``step_in_backward=True``) no selected gradient waits
for ``step()``; what remains at the peak of backward is autograd's *dense*
gradient of one weight, alive until the weight's hook has read it: 112 MB for
SD 1.5's largest convolution (2560→1280, 3×3), more than all activations at
that point with gradient checkpointing. So for a plain ``nn.Linear`` or
``nn.Conv2d`` whose dense gradient would exceed :data:`ROW_BLOCK_BYTES`, the
layer's forward runs through :class:`_RowBlockGrad`: the same ``F.linear`` /
``F.conv2d`` call forward, and in backward the input's and bias's gradients as
autograd computes them, then the weight's gradient for a block of output rows
(channels) at a time, each read at its trained entries and handed to the
update before the next block is made.

The numbers are the default step's up to rounding: each row of a weight's
gradient is the same sum over the same products whether computed alone or
with the others, but a matmul or convolution of another shape may add them in
another order (bit-identical for SD-1.5-sized blocks on this CPU, last-bit
differences on the small test UNet; ``tests/sara/test_fused_step.py`` bounds
them). Computing the rows in blocks costs a pass over the layer's input per
block (a convolution unfolds its input again for each).

The layer is switched to a subclass (:class:`RowBlockLinear`,
:class:`RowBlockConv2d`) that behaves exactly like its parent, and back when
SaRA detaches; in a copy of the model (``deepcopy``, pickle) it runs as its
parent, since the routing lives in this module, not in the layer. Under
autocast and inside ``torch.compile`` the layer runs as its parent too: its
weight then gets its whole gradient, which its hook reads as any other's.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

#: A weight whose dense gradient would be larger than this is updated from blocks of rows of at most this size.
ROW_BLOCK_BYTES = 16 << 20
_ROUTES: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()  # layer -> update(blocks)


class _RowBlockGrad(torch.autograd.Function):
    """``layer``'s forward with its weight's gradient handed to ``update`` in blocks of rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, update):
        ctx.layer, ctx.update = layer, update
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _forward(layer, x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        ctx.update(None)  # a second call of the layer in this step is refused here, before its old weight is read
        x, weight = ctx.saved_tensors
        layer, need_x, need_bias = ctx.layer, ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[2]
        if isinstance(layer, nn.Conv2d):
            # the bias's gradient apart: asked for with it, the CPU kernel makes the whole weight's gradient too
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, *_conv_args(layer),
                                                         [need_x, False, False])[0]
            grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None

            def rows(r0, r1):
                return torch.ops.aten.convolution_backward(grad_out[:, r0:r1], x, weight[r0:r1], None,
                                                           *_conv_args(layer), [False, True, False])[1]
        else:  # as at::linear folds its input to 2-D for addmm
            g2, x2 = grad_out.reshape(-1, weight.shape[0]), x.reshape(-1, weight.shape[1])
            grad_x = (g2 @ weight).view(x.shape) if need_x else None
            grad_bias = g2.sum(0) if need_bias else None

            def rows(r0, r1):
                return g2[:, r0:r1].t().mm(x2)

        grad_weight = None
        if not ctx.update(_row_blocks(weight, rows)):  # the optimizer is gone: an ordinary gradient, as autograd's
            grad_weight = torch.cat([block() for _, _, block in _row_blocks(weight, rows)]).view(weight.shape)
        return grad_x, grad_weight, grad_bias, None, None


def _forward(layer, x, weight, bias):
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def _conv_args(layer):
    # convolution_backward(..., stride, padding, dilation, transposed, output_padding, groups, mask)
    return list(layer.stride), list(layer.padding), list(layer.dilation), False, [0, 0], layer.groups


def _row_blocks(weight, rows):
    """(first flat position, number of positions, () -> their dense gradient), in order, ≤ ROW_BLOCK_BYTES each."""
    row = weight[0].numel()
    per_block = max(1, ROW_BLOCK_BYTES // (row * weight.element_size()))
    for r0 in range(0, weight.shape[0], per_block):
        r1 = min(r0 + per_block, weight.shape[0])
        yield r0 * row, (r1 - r0) * row, lambda r0=r0, r1=r1: rows(r0, r1).reshape(-1)


class _RowBlockLayer:
    def forward(self, x):
        update = _ROUTES.get(self)
        # the layer is its parent (its weight gets its whole gradient, and its hook updates it as any other's)
        # under torch.compile, where a traced backward must not hide the update's side effects,
        # and under autocast, whose casts of the weight autograd undoes in its own way
        if (update is None or not torch.is_grad_enabled() or not self.weight.requires_grad
                or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)):
            return super().forward(x)
        return _RowBlockGrad.apply(x, self.weight, self.bias, self, update)


class RowBlockLinear(_RowBlockLayer, nn.Linear):
    """An ``nn.Linear`` whose weight gradient goes to SaRA's per-layer update in blocks of rows."""


class RowBlockConv2d(_RowBlockLayer, nn.Conv2d):
    """An ``nn.Conv2d`` whose weight gradient goes to SaRA's per-layer update in blocks of rows."""


_ROUTED = {nn.Linear: RowBlockLinear, nn.Conv2d: RowBlockConv2d}


def routable(layer: nn.Module, weight: torch.Tensor) -> bool:
    """A plain Linear/Conv2d (no subclass: its forward may do more), this weight its own, too large to hold whole."""
    if type(layer) not in _ROUTED or layer.weight is not weight:
        return False
    if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)
                                         or layer.groups != 1):  # a block of output channels must see every input
        return False
    return weight.numel() * weight.element_size() > ROW_BLOCK_BYTES


class Route:
    """``layer``'s weight gradient goes to ``update(blocks)`` until :meth:`remove` (a hook handle's interface).

    ``update`` returns False if it could not take the gradient (its optimizer was deleted): the weight then gets
    the whole gradient as ``.grad``, as without the route. ``update(None)`` only checks that it can take one.
    """

    def __init__(self, layer: nn.Module, update):
        self.layer, self.parent = layer, type(layer)
        layer.__class__ = _ROUTED[self.parent]
        _ROUTES[layer] = update

    def remove(self) -> None:
        _ROUTES.pop(self.layer, None)
        self.layer.__class__ = self.parent
