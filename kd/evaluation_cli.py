"""The evaluation scripts' command line: their flags, the run to evaluate, then kd.evaluation.

Kept free of torch until a run is found, so that "no run yet" answers at once.
"""

from __future__ import annotations

import argparse

from kd.cli import ArgumentParser, train_command
from kd.config import load_task_config
from kd.errors import run_cli
from kd.record import newest_run
from kd.report import format_task_result
from kd.runs import setup_logging
from kd.settings import TrainSettings


def task_parser(task: str | None) -> argparse.ArgumentParser:
    """The flags of evaluation_task<a|b>.py (`task` A or B) and of evaluation_task.py (None: --config is required)."""
    name = task or "<name>"
    p = ArgumentParser(description=f"Evaluate task {name}'s student and teachers on the test split: "
                                   f"metrics.json and figures in evaluation/Task{name}/.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, required=task is None, metavar="YAML",
                   help="a task config file (the one the run was trained with)" + (f"; overrides task {task}"
                                                                                     if task else ""))
    p.add_argument("--run_dir", default=None,
                   help=f"run folder to evaluate (default: the newest Task{name}_* run with a checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="student weights (default: the run's student.safetensors, else checkpoint_best.pt)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="device for the test-set pass; speed is always measured on CPU")
    p.add_argument("--output_dir", default=None, help=f"where results go (default: evaluation/Task{name})")
    p.add_argument("--runs_root", default="runs", help="folder holding the run folders")
    return p


def main_for_task(task: str | None = None, argv: list[str] | None = None) -> None:
    """The whole of evaluation_task<a|b>.py and evaluation_task.py: parse flags, evaluate, print a short result."""
    args = vars(task_parser(task).parse_args(argv))
    config = args.pop("config") or task

    def main():
        setup_logging()
        if args["run_dir"] is None and args["checkpoint"] is None:
            hint = train_command(TrainSettings(task=config))
            args["run_dir"] = newest_run(load_task_config(config).name, args["runs_root"], hint).run_dir
        from kd.evaluation import evaluate_task  # torch and timm load once there is a run to evaluate

        print(format_task_result(evaluate_task(config, **args)))

    run_cli(main)
