"""Reference residual convolutional unit (RCU) of the DPT fusion blocks.

    out = x + conv2(relu(conv1(relu(x)) + b1)) + b2   [+ extra]

conv1/conv2 are 3x3, stride 1, padding 1, C -> C. `extra` is the fusion block's other input, so the
block's `x0 + RCU1(skip)` is one operator. Batch norm (segmentation models) is folded into the
weights and biases before the call. The output has the same memory format as x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def residual_conv_unit(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
                       weight2: torch.Tensor, bias2: torch.Tensor,
                       extra: torch.Tensor | None = None) -> torch.Tensor:
    return residual_conv_unit_from_hidden(residual_conv_unit_hidden(x, weight1, bias1), x, weight2, bias2, extra)


def residual_conv_unit_plain(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
                             weight2: torch.Tensor, bias2: torch.Tensor,
                             extra: torch.Tensor | None = None) -> torch.Tensor:
    """`residual_conv_unit`'s math without the copy into x's memory format (the "inline" backend's form)."""
    result = F.conv2d(residual_conv_unit_hidden(x, weight1, bias1), weight2, bias2, padding=1) + x
    return result if extra is None else extra + result


def residual_conv_unit_hidden(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor) -> torch.Tensor:
    """The hidden activation relu(conv1(relu(x)) + b1) that conv2 reads (what training keeps for the backward)."""
    return torch.relu(F.conv2d(torch.relu(x), weight1, bias1, padding=1))


def residual_conv_unit_from_hidden(hidden: torch.Tensor, x: torch.Tensor, weight2: torch.Tensor,
                                   bias2: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The RCU's output given its hidden activation: x + conv2(hidden) + b2 [+ extra], in x's memory format."""
    result = F.conv2d(hidden, weight2, bias2, padding=1) + x
    if extra is not None:
        result = extra + result  # the fusion block adds x0 + RCU1(skip) in this order
    out = torch.empty_like(x)
    out.copy_(result)
    return out


def conv3x3_backward(grad: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor):
    """(d_inputs, d_weight) of a 3x3, stride 1, padding 1 convolution (aten's convolution backward)."""
    d_inputs, d_weight, _ = torch.ops.aten.convolution_backward(
        grad, inputs, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    return d_inputs, d_weight


def residual_conv_unit_backward(grad_out: torch.Tensor, x: torch.Tensor, weight1: torch.Tensor,
                                bias1: torch.Tensor, weight2: torch.Tensor, bias2: torch.Tensor,
                                has_extra: bool, hidden: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Gradients [dx, dweight1, dbias1, dweight2, dbias2, dextra]; dextra is grad_out itself
    (an empty tensor when there was no extra input). `hidden`: the forward's residual_conv_unit_hidden,
    when it was kept; None recomputes it (one more convolution).

    Written out rather than taken from autograd: an operator body runs below the autograd layer.
    """
    relu_x = torch.relu(x)
    if hidden is None:
        hidden = torch.relu(F.conv2d(relu_x, weight1, bias1, padding=1))
    d_hidden, d_weight2 = conv3x3_backward(grad_out, hidden, weight2)
    d_hidden = d_hidden * (hidden > 0)  # hidden > 0 <=> conv1(relu(x)) + b1 > 0
    d_relu_x, d_weight1 = conv3x3_backward(d_hidden, relu_x, weight1)
    d_x = grad_out + d_relu_x * (x > 0)
    d_extra = grad_out.clone() if has_extra else grad_out.new_empty(0)
    return [d_x, d_weight1, d_hidden.sum((0, 2, 3)), d_weight2, grad_out.sum((0, 2, 3)), d_extra]
