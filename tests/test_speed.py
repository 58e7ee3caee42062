"""The arithmetic a model needs and what the device can do: kd.speed.forward_flops and matmul_peak,
which benchmarks/throughput.py --efficiency divides, and that benchmark's comparisons of batch sizes and
of kd.layers against PyTorch's layers."""

import pytest
import torch
import torch.nn as nn

from kd.config import load_task_config
from kd.speed import forward_flops, matmul_peak
from tests.conftest import load_benchmark, write_task


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


def test_the_throughput_benchmark_times_the_students_step_at_each_batch_size(tiny_students, tmp_path, capsys):
    script = load_benchmark("throughput")
    script.main(script.get_args_parser().parse_args(["--task", str(write_task(tmp_path)), "--subset", "96",
                                                     "--device", "cpu", "--batch_sizes", "16", "48"]))
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[1] for row in rows] == ["16", "48"]
    rates = [float(row[2]) for row in rows]
    assert all(rate > 0 for rate in rates)
    assert rows[0][4] == "(1.00x" and float(rows[1][4].strip("(x")) == pytest.approx(rates[1] / rates[0], rel=0.02)


def test_the_throughput_benchmark_refuses_a_batch_size_below_one(capsys):
    with pytest.raises(SystemExit) as stop:
        load_benchmark("throughput").get_args_parser().parse_args(["--batch_sizes", "128", "0"])
    assert stop.value.code == 2 and "--batch_sizes" in capsys.readouterr().err


def test_the_throughput_benchmark_times_every_models_step_with_and_without_the_fast_layers(tiny_students, tmp_path,
                                                                                          capsys):
    script = load_benchmark("throughput")
    task = write_task(tmp_path)
    script.main(script.get_args_parser().parse_args(["--task", str(task), "--subset", "64", "--batch_size", "32",
                                                     "--device", "cpu", "--layers"]))
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    labels = [f"{row[0]} {row[1]}" for row in rows]
    assert labels[:3] == ["student MobileNetV3", "student EfficientNet", "student ResNet18"]
    assert len(labels) == 3 + len(load_task_config(str(task)).teachers) and labels[3].startswith("teacher")
    tiny_efficientnet = rows[0]
    assert int(tiny_efficientnet[3]) > 0  # its depthwise and 1x1 layers were handed back to PyTorch
    plain, fast, ratio = float(tiny_efficientnet[4]), float(tiny_efficientnet[5]), tiny_efficientnet[6]
    assert float(ratio.rstrip("x")) == pytest.approx(fast / plain, abs=0.01)
