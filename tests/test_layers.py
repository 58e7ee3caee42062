"""kd.layers: the faster CPU forms of depthwise and 1x1 convolutions compute what nn.Conv2d computes."""

import copy
import itertools

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import kd.layers
from kd.layers import (DepthwiseConv2d, PointwiseConv2d, depthwise_weight_grad, onednn_gradient_falls_back,
                       use_fast_layers, use_plain_layers)
from kd.models import create_model


@pytest.mark.parametrize("kernel, stride", itertools.product([1, 3, 5, 7], [1, 2, 3]))
def test_the_tap_sums_are_the_depthwise_weight_gradient(kernel, stride):
    torch.manual_seed(kernel * 10 + stride)
    for (height, width), padding in itertools.product([(1, 1), (2, 3), (4, 4), (5, 2), (7, 9)],
                                                      {0, kernel // 2, kernel // 2 + 1}):
        if height + 2 * padding < kernel or width + 2 * padding < kernel:
            continue  # no output
        x = torch.randn(2, 3, height, width, dtype=torch.float64)
        weight = torch.randn(3, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
        out = F.conv2d(x, weight, None, stride, padding, 1, 3)
        grad_out = torch.randn_like(out)
        expected, = torch.autograd.grad(out, weight, grad_out)
        got = depthwise_weight_grad(x, grad_out, kernel, stride, padding)
        torch.testing.assert_close(got, expected, msg=f"{height}x{width} map, padding {padding}")


@pytest.mark.parametrize("size, kernel, stride, padding, falls_back", [
    (2, 3, 1, 1, True), (3, 3, 1, 1, False),     # stride 1: the map must hold the kernel
    (3, 3, 2, 1, True), (4, 3, 2, 1, False),     # odd padding by stride 2: one pixel more
    (4, 5, 1, 2, True), (5, 5, 1, 2, False),
    (4, 5, 2, 2, True), (5, 5, 2, 2, False),
])
def test_the_fallback_rule_is_onednns_boundary_check(size, kernel, stride, padding, falls_back):
    assert onednn_gradient_falls_back(size, kernel, stride, padding) is falls_back


def student_pair(arch: str) -> tuple[nn.Module, nn.Module]:
    """The same network twice, PyTorch's layers and kd.layers', with a random classifier so that every
    layer gets a gradient at once (the project starts classifiers at zero)."""
    torch.manual_seed(0)
    fast = create_model(arch, 10, 1, [0.5], [0.5])
    nn.init.normal_(fast.backbone.get_classifier().weight, std=0.1)
    plain = create_model(arch, 10, 1, [0.5], [0.5])
    plain.load_state_dict(fast.state_dict())
    use_plain_layers(plain)
    return fast.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", ["mobilenetv3_small_100", "efficientnet_b0"])
def test_a_student_with_the_fast_layers_trains_as_with_pytorchs(arch, monkeypatch):
    taps = []
    real = kd.layers.depthwise_weight_grad
    monkeypatch.setattr(kd.layers, "depthwise_weight_grad", lambda *args: taps.append(args[2]) or real(*args))
    fast, plain = (model.double() for model in student_pair(arch))  # float64: differences are the method's
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    outputs = {}
    for name, model in (("fast", fast), ("plain", plain)):
        torch.manual_seed(1)  # the same dropout masks
        logits = model.train()(x)
        F.cross_entropy(logits, y).backward()
        outputs[name] = logits
    torch.testing.assert_close(outputs["fast"], outputs["plain"])
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-12, msg=name)
    assert 5 in taps  # the 5x5 layers on the last maps took the tap sums


def test_fast_layers_keep_the_architecture_and_the_weights_files():
    plain = timm.create_model("mobilenetv3_small_100", num_classes=10, in_chans=1)
    fast = timm.create_model("mobilenetv3_small_100", num_classes=10, in_chans=1)
    changed = use_fast_layers(fast)
    assert changed["depthwise"] == 11 and changed["pointwise"] > 20
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert use_plain_layers(fast) == sum(changed.values())
    assert not any(isinstance(m, (DepthwiseConv2d, PointwiseConv2d)) for m in fast.modules())


def test_a_pointwise_layer_is_the_matrix_product_and_stays_channels_last():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 1)
    fast = nn.Conv2d(6, 4, 1)
    fast.load_state_dict(conv.state_dict())
    use_fast_layers(fast)
    assert isinstance(fast, PointwiseConv2d)
    x = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    out = fast(x)
    assert out.grad_fn.name() == "PermuteBackward0"  # the product's pixels back in (B, C, H, W) order
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, conv(x))
    large = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    for plain_path in (x.contiguous(), large):  # NCHW, and a map above POINTWISE_MAX_PIXELS: PyTorch's own
        out = fast(plain_path)
        assert out.grad_fn.name() == "ConvolutionBackward0"
        torch.testing.assert_close(out, conv(plain_path))


def test_a_traced_model_holds_plain_convolutions():
    """Exporters and tracers are given nn.Conv2d's computation, so exported files hold ordinary layers."""
    fast, _ = student_pair("mobilenetv3_small_100")
    x = torch.rand(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    graph = str(torch.jit.trace(fast.eval(), x).inlined_graph)
    convolutions = sum(isinstance(m, nn.Conv2d) for m in fast.modules())
    assert graph.count("aten::_convolution(") == convolutions and graph.count("aten::linear(") == 1  # the head


def test_an_exported_model_holds_plain_convolutions():
    fast, _ = student_pair("mobilenetv3_small_100")
    x = torch.rand(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    operators = [str(node.target) for node in torch.export.export(fast.eval(), (x,)).graph.nodes
                 if node.op == "call_function"]
    assert sum("conv" in name for name in operators) == sum(isinstance(m, nn.Conv2d) for m in fast.modules())
    assert sum("linear" in name for name in operators) == 1  # the head


def test_torch_compile_compiles_the_fast_forms():
    """Under torch.compile the layers keep their CPU forms (compiled with the plain ones, MobileNetV3 trained
    slower than eagerly with these), and compute what nn.Conv2d computes."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Conv2d(8, 4, 1)).double()
    fast = copy.deepcopy(plain)
    assert use_fast_layers(fast) == {"depthwise": 1, "pointwise": 1}
    graphs = []

    def recording(graph, example_inputs):
        graphs.append(graph.code)
        return graph.forward

    x = torch.randn(3, 8, 2, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    for model in (plain, torch.compile(fast, backend=recording, fullgraph=True)):
        model(x).square().sum().backward()
    # the depthwise layer's own gradient (a 5x5 kernel on a 2x2 map), the 1x1 layer's matrix product
    assert "autograd_function_apply" in graphs[0] and "linear" in graphs[0] and "conv2d" not in graphs[0]
    for p, q in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_without_a_gradient_or_under_autocast_the_depthwise_layer_is_pytorchs(monkeypatch):
    calls = []
    monkeypatch.setattr(kd.layers._DepthwiseConv, "apply", lambda *args: calls.append(args))
    layer = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    use_fast_layers(layer)
    x = torch.randn(2, 8, 2, 2)
    with torch.no_grad():
        layer(x)
    layer.weight.requires_grad_(False)
    layer(x)
    assert calls == []
    layer.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert calls == []
    layer(x)
    assert len(calls) == 1
