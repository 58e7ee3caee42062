import csv
import dataclasses
import hashlib
import os
import shlex
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import train
import tune
from kd.checkpoint import load_weights, save_weights
from kd.cli import train_command
from kd.errors import Terminated, UserError, run_cli
from kd.experiments import tuning
from kd.experiments.tune_plan import TunePlan
from kd.experiments.tuning import DEFAULT_SPACE, Choices, FloatRange, Fixed, load_search_space, retry_of
from kd.record import read_record
from kd.settings import TrainSettings
from tests.conftest import ROOT, script_command, signal_when, write_task

STUDY = "TaskT_MobileNetV3"  # the default study name of the tiny task and this student
GOOD = {"temperature": 2.0, "alpha": 0.5, "lr": 0.01, "weight_decay": 1e-5, "teacher_weighting": "uniform"}


def tune_args(config: Path, out: Path, *extra: str) -> list[str]:
    # batch 256: 4 steps an epoch, so trials that only need to run cost about a second an epoch
    return ["--config", str(config), "--device", "cpu", "--student_model", "MobileNetV3", "--num_epochs", "2",
            "--batch_size", "256", "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"), *extra]


def sqlite(out: Path) -> str:
    return f"sqlite:///{out / 'study.db'}"


def finished(study: optuna.Study) -> list:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_search_space_defaults_file_ranges_and_fixed_flags(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("temperature: {low: 2, high: 4}\nalpha: 0.7\nlr: ['1e-3', 0.01]\n")
    space = load_search_space(str(space_file), {"teacher_weighting": "entropy"})
    assert space["temperature"] == FloatRange(2.0, 4.0)
    assert space["alpha"] == Fixed(0.7) and space["teacher_weighting"] == Fixed("entropy")
    assert space["lr"] == Choices((0.001, 0.01))  # YAML reads 1e-3 as text: still a number here
    assert space["weight_decay"] == DEFAULT_SPACE["weight_decay"]
    shipped = load_search_space(str(ROOT / "configs" / "search_space.yaml"), {})
    assert shipped == DEFAULT_SPACE  # the documented file is the default


@pytest.mark.parametrize("text, message", [
    ("beta: {low: 0, high: 1}\n", "unknown parameter 'beta'"),
    ("temperature: {low: 4, high: 4}\n", "empty range [4, 4]"),
    ("alpha: {low: 0.5, high: 1.5}\n", "alpha must be in [0, 1], got 1.5"),
    ("weight_decay: {low: 0, high: 0.1, log: true}\n", "a log range needs low > 0"),
    ("teacher_weighting: {low: 0, high: 1}\n", "takes a list of names"),
    ("teacher_weighting: []\n", "empty list of choices"),
    ("lr: {low: 0.1}\n", "needs {low: ..., high: ...}"),
    ("- lr\n", "expected a mapping"),
])
def test_bad_search_space_files_name_the_problem(tmp_path, text, message):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(text)
    with pytest.raises(UserError, match="space.yaml") as err:
        load_search_space(str(space_file), {})
    assert message in str(err.value)


def test_nothing_to_search_is_refused():
    with pytest.raises(UserError, match="nothing to search"):
        load_search_space(None, {name: getattr(TrainSettings(), name) for name in DEFAULT_SPACE})


def test_train_command_parses_back_to_the_same_settings():
    settings = TrainSettings(task="some/task.yaml", lr=0.000482, alpha=0.26, temperature=4.52, amp=False,
                             channels_last=False, compile=True, teacher_weighting="fixed", teacher_weights=(1.0, 2.0),
                             teacher_epochs=3, student_model="ResNet18", lr_schedule="cosine", run="x",
                             output_dir="elsewhere")
    argv = shlex.split(train_command(settings))[2:]
    options = vars(train.get_args_parser().parse_args(argv))
    options["task"] = options.pop("config") or options["task"]
    options.pop("teachers_only")
    options["teacher_weights"] = tuple(options["teacher_weights"])
    parsed = TrainSettings(**options)
    assert parsed == TrainSettings(**{**settings.__dict__, "run": "", "output_dir": "runs"})


def enqueue(out: Path, *params: dict) -> None:
    study = optuna.create_study(storage=sqlite(out), study_name=STUDY, direction="maximize")
    for values in params:
        study.enqueue_trial(values)


@pytest.mark.slow
def test_a_search_prunes_a_hopeless_trial_continues_on_rerun_and_reports(tmp_path, tiny_teachers, tiny_students,
                                                                        monkeypatch):
    config, out = write_task(tmp_path, tiny_teachers), tmp_path / "out"
    out.mkdir()
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 1.0e-7, high: 0.02, log: true}\n")
    # a good trial, then one that cannot learn: the median pruner (comparing after one complete trial here,
    # to keep the test short) must stop it once its warm-up epoch is done. Batch 32: the good trial needs
    # enough steps in that epoch to leave chance behind on any CPU
    monkeypatch.setattr(tuning, "PRUNER_STARTUP_TRIALS", 1)
    enqueue(out, GOOD, {**GOOD, "lr": 1e-7})
    argv = tune_args(config, out, "--batch_size", "32", "--prune_warmup", "1", "--search_space", str(space))
    tune.main([*argv, "--trials", "2"])

    study = optuna.load_study(study_name=STUDY, storage=sqlite(out))
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]
    hopeless = study.trials[1]
    assert len(hopeless.intermediate_values) == 1  # stopped after epoch 1 of 2
    with (out / hopeless.user_attrs["run_dir"] / "metrics.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 1
    first = [(t.number, t.value, t.params) for t in study.trials]

    tune.main([*argv, "--trials", "3"])  # the same command with more trials continues the study
    study = optuna.load_study(study_name=STUDY, storage=sqlite(out))
    assert [(t.number, t.value, t.params) for t in study.trials[:2]] == first
    assert len(finished(study)) == 3 and study.trials[2].number == 2
    with (out / "trials.csv").open() as f:
        assert [int(row["trial"]) for row in csv.DictReader(f)] == [0, 1, 2]
    for figure in ("history.png", "importance.png", "temperature_alpha.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"

    result = yaml.safe_load((out / "best.yaml").read_text())
    best = study.best_trial
    assert result["best"]["trial"] == best.number and result["best"]["val_acc"] == pytest.approx(best.value)
    assert 0.0 <= result["best"]["test_acc"] <= 1.0
    assert "defaults" not in result  # trials were enqueued before tune.py made the study: no defaults trial
    # the best command line trains exactly the best trial's settings
    argv = shlex.split(result["best"]["command"])
    assert argv[:2] == ["python", "train.py"]
    options = vars(train.get_args_parser().parse_args(argv[2:]))
    options["task"] = options.pop("config") or options["task"]
    options.pop("teachers_only")
    ran = read_record(out / best.user_attrs["run_dir"]).settings
    assert TrainSettings(**options) == TrainSettings(**{**ran.__dict__, "run": "", "output_dir": "runs"})
    assert f"tuned **{result['best']['test_acc']:.2%}**" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_a_new_study_starts_with_the_defaults_and_reports_them_beside_the_best(tmp_path, capsys, tiny_students):
    config, out = write_task(tmp_path), tmp_path / "out"
    # a folder left by an earlier study under the name trial 0's run gets: the new trial must not score it
    leftover = out / "trials" / "TaskT_MobileNetV3_T2.0_a0.0_trial0"
    leftover.mkdir(parents=True)
    save_weights(torch.nn.Linear(1, 1), leftover / "student.safetensors", {"val_acc": 0.999})
    # alpha fixed at 0 (labels only: no teachers needed), the other settings searched
    tune.main([*tune_args(config, out, "--num_epochs", "1"), "--alpha", "0", "--trials", "2", "--confirm_seeds", "1"])
    study = optuna.load_study(study_name=STUDY, storage=sqlite(out))
    defaults = study.trials[0]
    assert defaults.user_attrs["run_dir"] == "trials/TaskT_MobileNetV3_T2.0_a0.0_trial0-2"
    own = load_weights(out / defaults.user_attrs["run_dir"] / "student.safetensors")[1]["val_acc"]
    assert defaults.value == own != 0.999
    assert defaults.user_attrs["role"] == "defaults"
    assert defaults.params == {"temperature": 2.0, "lr": 0.001, "weight_decay": 0.0005, "teacher_weighting": "uniform"}
    assert defaults.user_attrs["settings"] == {**defaults.params, "alpha": 0.0, "kd_loss": "kd"}
    result = yaml.safe_load((out / "best.yaml").read_text())
    assert result["defaults"]["trial"] == 0 and result["defaults"]["val_acc"] == pytest.approx(defaults.value)
    confirmation = result["confirmation"]
    row = confirmation["test_acc_percent"][1]
    assert confirmation["paired_mean"] == pytest.approx(row["tuned"] - row["defaults"])
    assert confirmation["verdict"] == "within noise"  # one seed proves nothing
    printed = capsys.readouterr().out
    assert "train.py's defaults" in printed and "Confirmation over seeds 1 " in printed


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_two_processes_share_one_study(tmp_path, storage, request, tiny_students):
    url = request.getfixturevalue("postgres_url") if storage == "postgresql" else sqlite(tmp_path / "out")
    config, out = write_task(tmp_path), tmp_path / "out"
    out.mkdir()
    argv = tune_args(config, out, "--trials", "4", "--storage", url, "--study_name", f"shared_{storage}",
                     "--alpha", "0", "--num_epochs", "1")
    command = script_command("tune.py", argv, tiny=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    study = optuna.load_study(study_name=f"shared_{storage}", storage=url)
    done = finished(study)
    assert 4 <= len(done) <= 5  # each worker stops once the study holds 4; one may be finishing its last
    assert len({t.user_attrs["worker"]["pid"] for t in done}) == 2  # both worked on the one study
    assert sum(t.user_attrs.get("role") == "defaults" for t in study.trials) == 1
    assert not (out / "study.db").exists() or storage == "sqlite"


@pytest.mark.slow
def test_a_killed_search_reruns_the_trial_it_left_running(tmp_path, kd_log, tiny_students):
    config, out = write_task(tmp_path), tmp_path / "out"
    # alpha fixed at 0: no teachers needed. Trial 1 is killed within milliseconds of its first epoch, long
    # before its second ends
    argv = tune_args(config, out, "--trials", "3", "--alpha", "0")
    command = script_command("tune.py", argv, tiny=True)

    def second_trial_started() -> bool:
        return len(list((out / "trials").glob("*/checkpoint_last.pt"))) >= 2

    status, log = signal_when(command, second_trial_started, signal.SIGKILL, tmp_path / "first.log", cwd=tmp_path)
    assert status == -signal.SIGKILL, log[-3000:]
    study = optuna.load_study(study_name=STUDY, storage=sqlite(out))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]  # nobody failed it

    tune.main(argv)  # the rerun in this process: a new one spends seconds importing torch and timm
    assert "trial 1 was left running by a process that no longer exists; it runs again" in kd_log.messages
    assert_retried(optuna.load_study(study_name=STUDY, storage=sqlite(out)))


def assert_retried(study: optuna.Study) -> None:
    """Trial 1 was stopped from outside: failed, and trial 2 ran its settings again."""
    assert study.trials[1].state == TrialState.FAIL
    retry = study.trials[2]
    assert retry_of(retry) == 1 and retry.params == study.trials[1].params
    assert retry.state == TrialState.COMPLETE and len(finished(study)) == 3


@pytest.mark.slow
def test_ctrl_c_or_sigterm_queues_the_running_trial_again(tmp_path, monkeypatch, tiny_students):
    config, out = write_task(tmp_path), tmp_path / "out"
    argv = tune_args(config, out, "--trials", "3", "--alpha", "0", "--num_epochs", "1")
    train = tuning.train_student

    def interrupted_in_trial_1(settings, hooks):
        if settings.run == "trial1":
            raise Terminated()  # what SIGTERM raises (a KeyboardInterrupt, as Ctrl-C)
        return train(settings, hooks=hooks)

    monkeypatch.setattr(tuning, "train_student", interrupted_in_trial_1)
    with pytest.raises(Terminated):
        tune.main(argv)
    monkeypatch.setattr(tuning, "train_student", train)
    tune.main(argv)
    assert_retried(optuna.load_study(study_name=STUDY, storage=sqlite(out)))


def existing_study(out: Path) -> bytes:
    """An SQLite study with one finished trial; returns the database's bytes."""
    out.mkdir(parents=True)
    study = optuna.create_study(storage=sqlite(out), study_name=STUDY, direction="maximize")
    study.add_trial(optuna.create_trial(value=0.5, params={"alpha": 0.5},
                                        distributions={"alpha": optuna.distributions.FloatDistribution(0, 1)}))
    return hashlib.sha256((out / "study.db").read_bytes()).digest()


@pytest.mark.parametrize("extra, status, message", [
    (["--trials", "0"], 2, "--trials: must be >= 1, got 0"),
    (["--search_space", "SPACE"], 1, "unknown parameter 'beta'"),
    (["--search_space", "EMPTY"], 1, "empty range"),
    (["--storage", "postgresql+psycopg2://nobody@127.0.0.1:9/none"], 1, "cannot open the study storage"),
    (["--storage", "nosuchdb://x"], 1, "cannot open the study storage"),
    (["--alpha", "0.5", "--num_epochs", "3"], 1, "was started with other settings"),
])
def test_bad_input_stops_with_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch, extra, status, message):
    monkeypatch.setattr(tuning, "OPEN_RETRY_S", 0.0)  # a storage that cannot open is tried again at once
    config, out = write_task(tmp_path), tmp_path / "out"
    before = existing_study(out)
    (tmp_path / "space.yaml").write_text("beta: {low: 0, high: 1}\n")
    (tmp_path / "empty.yaml").write_text("lr: {low: 0.01, high: 0.001}\n")
    files = {"SPACE": str(tmp_path / "space.yaml"), "EMPTY": str(tmp_path / "empty.yaml")}
    if message == "was started with other settings":  # a study of this budget, then another budget
        optuna.load_study(study_name=STUDY, storage=sqlite(out)).set_user_attr("budget", {"num_epochs": 2})
        before = hashlib.sha256((out / "study.db").read_bytes()).digest()
    argv = tune_args(config, out, *[files.get(a, a) for a in extra])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: tune.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == status and message in err and len(err.strip().splitlines()) == 1, err
    assert "password" not in err
    assert hashlib.sha256((out / "study.db").read_bytes()).digest() == before
    assert not (out / "trials").exists()


def test_a_study_started_before_a_setting_existed_continues_with_it_at_its_default(tmp_path):
    plan = TunePlan(TrainSettings(task="A", num_epochs=2), dict(DEFAULT_SPACE), trials=1)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = tuning.open_study(url, STUDY, plan)
    study.set_user_attr("budget", {k: v for k, v in study.user_attrs["budget"].items() if k != "mixup"})
    tuning.open_study(url, STUDY, plan)  # no "started with other settings"
    with pytest.raises(UserError, match="budget mixup: 0.0 then, 0.4 now"):
        tuning.open_study(url, STUDY, dataclasses.replace(plan, settings=TrainSettings(task="A", num_epochs=2,
                                                                                           mixup=0.4)))


def test_the_space_can_search_the_method_and_its_own_parameters(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("kd_loss: [kd, dkd]\nnckd_weight: {low: 1, high: 8}\n")
    space = load_search_space(str(space_file), {})
    assert space["kd_loss"] == Choices(("kd", "dkd")) and space["nckd_weight"] == FloatRange(1.0, 8.0)
    plan = TunePlan(TrainSettings(task="A"), space)
    assert tuning.trial_settings(plan, {"kd_loss": "dkd", "nckd_weight": 2.5}).kd_params == ("nckd_weight=2.5",)
    kd_trial = tuning.trial_settings(plan, {"kd_loss": "kd", "nckd_weight": 2.5})
    assert (kd_trial.kd_loss, kd_trial.kd_params) == ("kd", ())  # kd takes no nckd_weight: not passed to it
    assert tuning.default_values(space)["nckd_weight"] == 8.0  # the method's default is the baseline
    space_file.write_text("kd_loss: [kd, mkd]\n")
    with pytest.raises(UserError, match="kd_loss 'mkd' is not one of kd, dkd, ls, dist"):
        load_search_space(str(space_file), {})
    space_file.write_text("nckd_weight: {low: -1, high: 8}\n")
    with pytest.raises(UserError, match="nckd_weight must be >= 0"):
        load_search_space(str(space_file), {})
