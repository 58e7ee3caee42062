"""Recipes: YAML files of train.py flag values that become the defaults; the command line still wins."""

import pytest
import yaml

import train
from kd.cli import RECIPE_DIR, parse_with_recipe
from kd.experiments.study import budget_of, read_rows, same_budget
from kd.record import read_record
from kd.settings import TrainSettings
from tests.conftest import ROOT, run_in_process, write_task

QUICK_START = ["--task", "A", "--student_model", "MobileNetV3", "--num_epochs", "40", "--lr", "0.002",
               "--batch_size", "64", "--lr_schedule", "cosine", "--stride_reduction", "2", "--alpha", "0.9",
               "--temperature", "8", "--mixup", "0.4", "--run", "quick"]


def parse(argv: list[str]) -> dict:
    return vars(parse_with_recipe(train.get_args_parser(), argv))


def test_the_quick_recipe_is_the_quick_start_command_and_the_command_line_wins():
    from_recipe = parse(["--task", "A", "--recipe", "quick"])
    assert {**from_recipe, "recipe": None} == parse(QUICK_START)
    assert parse(["--task", "A", "--recipe", "quick", "--num_epochs", "5"])["num_epochs"] == 5
    assert parse(["--num_epochs", "5", "--recipe", "quick"])["num_epochs"] == 5  # wherever the flag stands


def test_every_shipped_recipe_parses_and_leaves_the_seeds_defaults_alone():
    for path in RECIPE_DIR.glob("*.yaml"):
        parse(["--recipe", path.stem])
    assert parse([])["alpha"] == TrainSettings().alpha == 0.1


def test_task_bs_30_minute_recipe_is_the_budget_its_published_figure_was_measured_at():
    options = parse(["--task", "B", "--recipe", "task_b_30min"])
    options.pop("config"), options.pop("teachers_only")
    # the study ran on the CPU and named each flag; the recipe serves any device
    budget = budget_of(TrainSettings(**{**options, "device": "cpu", "recipe": None}))
    rows = read_rows(ROOT / "evaluation/study/TaskB_27ep_flip_mixup/runs.csv")
    assert sorted(row["seed"] for row in rows) == [1, 2, 3]
    for row in rows:
        assert (row["task"], row["arm"]) == ("B", "uniform")
        assert (row["student"], row["alpha"]) == (options["student_model"], options["alpha"])  # beside the budget
        assert same_budget(row["budget"], budget), row["budget"]


def test_a_recipe_file_by_path_with_booleans_lists_and_method_parameters(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("amp: false\ncompile: true\nteacher_weighting: fixed\nteacher_weights: [1, 3]\n"
                      "kd_loss: dkd\nkd_params: [nckd_weight=2]\n")
    values = parse(["--recipe", str(recipe)])
    assert (values["amp"], values["compile"], values["teacher_weights"]) == (False, True, [1.0, 3.0])
    assert (values["kd_loss"], values["kd_params"], values["recipe"]) == ("dkd", ["nckd_weight=2"], str(recipe))


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("start.pth", "start.pth")])
def test_a_recipe_gives_the_pretrained_flag_its_optional_value(tmp_path, value, expected):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"pretrained: {value}\n")
    assert parse(["--recipe", str(recipe)])["pretrained"] == expected


@pytest.mark.parametrize("text, message", [
    ("lr: 0.01\nbeta: 2\n", "unknown key(s) beta"),
    ("task: B\n", "unknown key(s) task"),
    ("alpha: 1.5\n", "argument --alpha: must be in [0, 1], got 1.5"),
    ("student_model: VGG\n", "unknown student 'VGG'"),
    ("- lr\n", "expected a mapping"),
])
def test_a_bad_recipe_is_one_line_exit_2(tmp_path, capsys, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        parse(["--recipe", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err and str(recipe) in err


def test_a_missing_recipe_names_the_shipped_ones(capsys):
    with pytest.raises(SystemExit):
        parse(["--recipe", "nosuch"])
    assert "no such recipe (shipped: quick, task_b_15min, task_b_30min;" in capsys.readouterr().err


def test_the_run_records_its_recipe(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"num_epochs": 1, "alpha": 0.0, "student_model": "MobileNetV3",
                                      "batch_size": 256, "device": "cpu"}))
    run_dir = run_in_process(["--config", str(write_task(tmp_path)), "--recipe", str(recipe),
                              "--output_dir", str(tmp_path / "runs")], capsys)
    settings = read_record(run_dir).settings
    assert settings.recipe == str(recipe) and settings.num_epochs == 1 and settings.batch_size == 256
