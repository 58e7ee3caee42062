"""The arithmetic a model needs and what the device can do: kd.speed.forward_flops and matmul_peak,
which benchmarks/throughput.py --efficiency divides."""

import torch
import torch.nn as nn

from kd.speed import forward_flops, matmul_peak


def test_forward_flops_count_two_per_multiply_add_of_linear_and_conv_layers():
    linear = nn.Linear(4, 3)
    assert forward_flops(linear, torch.rand(2, 4)) == 2 * 2 * 4 * 3
    conv = nn.Conv2d(2, 5, kernel_size=3, padding=1)  # 5 x 8 x 8 outputs of 2 x 3 x 3 products each
    assert forward_flops(conv, torch.rand(1, 2, 8, 8)) == 2 * (5 * 8 * 8) * (2 * 3 * 3)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(5 * 8 * 8, 3)).train()
    assert forward_flops(model, torch.rand(1, 2, 8, 8)) == 2 * 5 * 64 * 18 + 2 * 320 * 3
    assert model.training  # counted in eval mode, handed back as it was


def test_the_matmul_peak_is_the_products_flops_over_their_time():
    peak = matmul_peak(torch.float32, size=128, runs=3)
    assert 1e6 < peak < 1e15  # a plausible FLOP/s for any CPU (2 x 128^3 per product)
