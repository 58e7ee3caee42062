"""Faster CPU forms of two convolutions that mobile networks are made of, with the same weights and outputs.

On the CPU, PyTorch runs convolutions through oneDNN, which is slow for two cases that small images make
common (docs/training.md, "Faster layers on the CPU", has the measurements):

- A depthwise convolution's weight gradient on a map smaller than its kernel (oneDNN's kernel for it then
  refuses the shape and a generic grouped matrix product takes over): 15-35 ms for a 5x5 layer on a 4x4 map
  against under 1 ms for its forward (2 threads, batch 128). On 28x28 Fashion-MNIST such layers took 60% of
  MobileNetV3's training step. `DepthwiseConv2d` computes that gradient as one multiply-and-sum per kernel
  tap (`depthwise_weight_grad`), 5-15x faster; its forward and input gradient stay PyTorch's.
- A 1x1 convolution on a small map: it is a matrix product over pixels, and on channels-last maps of at
  most 7x7 pixels it runs as one (`PointwiseConv2d`) 1.1-10x faster than oneDNN's convolution, forward
  and backward; on 14x14 maps and larger oneDNN is as fast or faster, and keeps them.

`use_fast_layers` gives a model these forms in place. Each layer keeps its class's parameters and
state_dict keys, so weights files, checkpoints and exports are unchanged; on other devices, under
autocast, and while torch.export or torch.jit.trace records the model, each is the plain `nn.Conv2d`.
torch.compile compiles the forms themselves: with the plain convolutions a compiled MobileNetV3 trained
slower than the eager one with these forms, with them faster. Results differ from PyTorch's only in the
order of floating-point sums. The depthwise form's gradient is a plain autograd.Function: torch.func
transforms (vmap, forward-mode AD) are not supported through it in training, where the project uses none.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def use_fast_layers(model: nn.Module) -> dict[str, int]:
    """Give every plain depthwise and 1x1 convolution of `model` its faster form, in place; returns how
    many layers of each kind changed."""
    changed = {"depthwise": 0, "pointwise": 0}
    for module in model.modules():
        if is_plain_depthwise(module):
            module.__class__ = DepthwiseConv2d
            changed["depthwise"] += 1
        elif is_plain_pointwise(module):
            module.__class__ = PointwiseConv2d
            changed["pointwise"] += 1
    return changed


def use_plain_layers(model: nn.Module) -> int:
    """Undo `use_fast_layers`: every layer it changed computes as nn.Conv2d again (to compare the two);
    returns how many changed."""
    fast = [m for m in model.modules() if isinstance(m, (DepthwiseConv2d, PointwiseConv2d))]
    for module in fast:
        module.__class__ = nn.Conv2d
    return len(fast)


def is_plain_depthwise(module: nn.Module) -> bool:
    """An nn.Conv2d with one filter per channel, a square kernel, and the same stride and zero padding on
    both axes."""
    return (type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels > 1
            and module.kernel_size[0] == module.kernel_size[1] and module.stride[0] == module.stride[1]
            and isinstance(module.padding, tuple) and module.padding[0] == module.padding[1]
            and module.dilation == (1, 1) and module.padding_mode == "zeros")


def is_plain_pointwise(module: nn.Module) -> bool:
    """An ungrouped nn.Conv2d with a 1x1 kernel, stride 1 and no padding: a matrix product over pixels."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.kernel_size == (1, 1)
            and module.stride == (1, 1) and module.padding == (0, 0) and module.dilation == (1, 1))


def _fast_forms_may_run(x: torch.Tensor) -> bool:
    """Running on the CPU in the tensor's own precision, eagerly or under torch.compile: an exporter or
    tracer, and autocast, are given the plain convolution."""
    return (x.device.type == "cpu" and not torch.jit.is_tracing() and not torch.compiler.is_exporting()
            and not torch.is_autocast_enabled("cpu"))


# The largest map (pixels per image) on which a 1x1 convolution runs faster as a matrix product: measured
# faster at 7x7 and below, as fast or slower from 14x14 on (batches of 32 and 128, 16 to 576 channels).
POINTWISE_MAX_PIXELS = 49


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution computed, on small channels-last CPU maps, as the matrix product it is: each
    pixel's channels times the (out, in) weight. The output is channels-last, as oneDNN's would be."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_fast_forms_may_run(x) and x.shape[-2] * x.shape[-1] <= POINTWISE_MAX_PIXELS
                and x.is_contiguous(memory_format=torch.channels_last)):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise nn.Conv2d whose weight gradient is computed by `depthwise_weight_grad` where oneDNN's
    depthwise kernel refuses the map (`onednn_gradient_falls_back`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gradient_is_slow(x):
            return _DepthwiseConv.apply(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x)

    def _gradient_is_slow(self, x: torch.Tensor) -> bool:
        return (_fast_forms_may_run(x) and torch.is_grad_enabled() and self.weight.requires_grad
                and onednn_gradient_falls_back(min(x.shape[-2:]), self.kernel_size[0], self.stride[0],
                                               self.padding[0]))


def onednn_gradient_falls_back(size: int, kernel_size: int, stride: int, padding: int) -> bool:
    """Whether oneDNN's depthwise weight-gradient kernel refuses a map of `size` pixels a side. Its own
    applicability check, the same for every x86 instruction set, wants the input to hold the whole filter
    plus the padding's remainder by the stride. Measured with 240 channels, kernels 3 and 5, strides 1 and
    2, maps of 2 to 14 pixels: exactly the refused shapes are the ones slower than multiply-and-sum."""
    return size < kernel_size + (-padding) % stride


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.stride, ctx.padding = bias is not None, stride, padding
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], weight.shape[0],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_grad(x, grad_out, weight.shape[-1], stride, padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int, stride: int,
                          padding: int) -> torch.Tensor:
    """The gradient of a depthwise convolution's weight (C, 1, k, k) from its input x (B, C, H, W) and the
    gradient of its output (B, C, Ho, Wo): for each tap (u, v), the sum over images and output positions
    of the output's gradient times the input pixel the tap reads there. Positions where the tap reads
    padding add nothing and are skipped, so a tap that reads only padding gets zero.

    Both tensors are read channels-last, (B, H, W, C), so each product runs along contiguous channels (a
    view, no copy, for the channels-last tensors training uses)."""
    channels = x.shape[1]
    image, grad = x.permute(0, 2, 3, 1), grad_out.permute(0, 2, 3, 1)
    row_spans, col_spans = ([_tap_span(tap, stride, padding, image.shape[axis], grad.shape[axis])
                             for tap in range(kernel_size)] for axis in (1, 2))
    taps = []
    for rows in row_spans:
        for cols in col_spans:
            if rows is None or cols is None:
                taps.append(x.new_zeros(channels))
                continue
            (in_rows, out_rows), (in_cols, out_cols) = rows, cols
            taps.append((image[:, in_rows, in_cols] * grad[:, out_rows, out_cols]).sum((0, 1, 2)))
    return torch.stack(taps, 1).view(channels, 1, kernel_size, kernel_size)


def _tap_span(tap: int, stride: int, padding: int, size: int, out_size: int) -> tuple[slice, slice] | None:
    """Along one axis, the input positions a kernel tap reads (output i reads stride * i + tap - padding)
    and the outputs that read them, as slices; None where the tap reads only padding."""
    first = max(0, -((tap - padding) // stride))  # the first output whose input index is >= 0
    last = min(out_size - 1, (size - 1 + padding - tap) // stride)
    if first > last:
        return None
    start = stride * first + tap - padding
    return slice(start, start + stride * (last - first) + 1, stride), slice(first, last + 1)
