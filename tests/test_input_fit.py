import pytest

from tests.conftest import load_benchmark


def test_speed_of_a_timm_architecture_that_is_no_student(capsys):
    script = load_benchmark("input_fit")
    args = script.get_args_parser().parse_args(["--task", "A", "--students", "resnet10t",
                                                "--options", "16:1", "--speed_only", "--timing_images", "32",
                                                "--batch_size", "16"])
    script.main(args)
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"resnet10t"}
    for name, (_, size, halved, final_map, images_per_s, epochs) in rows.items():
        assert (size, halved, final_map) == ("16", "1", "1"), name  # 16 px, halved once: 32x becomes 16x
        assert float(images_per_s) > 0 and int(epochs) >= 1


def test_an_unknown_model_is_refused_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        load_benchmark("input_fit").get_args_parser().parse_args(["--students", "resnet_nonexistent"])
    assert stop.value.code == 2
    assert "neither a student (MobileNetV3, EfficientNet, ResNet18) nor a timm architecture: resnet_nonexistent" \
        in capsys.readouterr().err
