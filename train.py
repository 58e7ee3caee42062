"""Distil a task's teachers into a small student: python train.py --task B --alpha 0.6"""

import argparse
import os
import sys

from kd.cli import ArgumentParser, add_training_arguments, given_options, parse_with_recipe
from kd.config import load_task_config
from kd.errors import run_cli
from kd.settings import TrainSettings, settings_problem
from kd.students import check_test_time_flip

DEFAULTS = TrainSettings()


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Multi-teacher knowledge distillation into a small student.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_arguments(p)
    p.add_argument("--run", default=DEFAULTS.run, help="suffix for the run folder name")
    p.add_argument("--output_dir", default=DEFAULTS.output_dir, help="where run folders are created")
    p.add_argument("--teachers_only", action="store_true",
                   help="train the task's missing teachers (or load them), report their accuracy, and stop")
    p.add_argument("--recipe", default=DEFAULTS.recipe, metavar="NAME|FILE",
                   help="a YAML file of these flags' values that become the defaults (the command line still "
                        "wins): a shipped recipe of configs/recipes/ by name (quick: task A's quick start; "
                        "task_b_15min, task_b_30min), or a file's path; the run's config.yaml records it")
    p.add_argument("--resume", default=DEFAULTS.resume, metavar="auto|RUN",
                   help="continue a run from its checkpoint_last.pt with the settings it was started with "
                        "(a larger --num_epochs trains on): a run folder, its checkpoint, or auto (the newest "
                        "run these flags would name)")
    return p


def given_flags(argv: list[str]) -> set[str]:
    """The settings named on the command line, whatever their value (a resumed run warns about them)."""
    return given_options(get_args_parser(), argv)


def main(argv: list[str]) -> None:
    parser = get_args_parser()
    options = vars(parse_with_recipe(parser, argv))
    options["task"] = options.pop("config") or options["task"]
    teachers_only = options.pop("teachers_only")
    settings = TrainSettings(**options)
    if problem := settings_problem(settings):
        parser.error(problem)
    if not settings.resume:  # a resumed run reads its task from its record, not from the file as it is now
        task = load_task_config(settings.task)  # a bad task file is one line at once, not after torch has loaded
        check_test_time_flip(task, settings.test_time_flip)
    from kd.training import train_student, train_teachers

    if teachers_only:
        run_dir = train_teachers(settings)
    else:
        run_dir = train_student(settings, given=given_flags(argv))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from the whole job
        print(run_dir)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
