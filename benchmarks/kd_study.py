"""Accuracy study: each KD arm against --alpha 0 at the same budget, over seeds, per student.

Arms: alpha0 (labels only), uniform / entropy / confidence (KD with that teacher weighting, replaying
cached teacher logits), uniform_online (uniform KD with the teachers run online), and one arm per other
distillation method of kd.distillers (dkd, ls, dist: that --kd_loss, uniform, cached). Every run is a
train.py run (kd.training.train_student); teachers that are missing are trained by the first KD run.

    python benchmarks/kd_study.py --task A --num_epochs 30                  # 3 students x 8 arms x seeds 1 2 3
    python benchmarks/kd_study.py --task B --students MobileNetV3 --arms alpha0 uniform --seeds 1 2 3 4 5
    python benchmarks/kd_study.py --task A --num_epochs 30 --set teacher_epochs=5 amp=false

Writes to --output_dir (default evaluation/study/Task<name>/): runs.csv (a row per finished run, appended as
it ends), runs/ (the run folders), teachers.json, summary.md and study.png. Run the same command again
to continue a stopped study: runs already in runs.csv at the same budget are not trained again.
"""

from __future__ import annotations

import argparse

from kd.cli import ArgumentParser, add_output_dir, add_training_arguments, canonical_student
from kd.errors import run_cli
from kd.experiments.study import (ARMS, BUDGET_FLAGS, DEFAULT_SEEDS, StudyPlan, budget_settings, parse_overrides,
                                  run_study)
from kd.runs import setup_logging
from kd.settings import STUDENT_ARCHS


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--students", nargs="+", type=canonical_student, default=list(STUDENT_ARCHS), metavar="NAME",
                   help="students to train (case-insensitive)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="one run per seed and arm")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), metavar="ARM",
                   help="arms to train")
    add_training_arguments(p, BUDGET_FLAGS)  # train.py's flags, as train.py defines them
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="any other training setting (a TrainSettings field, e.g. teacher_epochs=5 amp=false "
                        "data_dir=data/TaskB), the same for every run")
    add_output_dir(p, "study folder (None: evaluation/study/Task<name>)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)

    def study():
        setup_logging()
        settings = budget_settings({key: getattr(args, key) for key in BUDGET_FLAGS}, parse_overrides(args.overrides))
        plan = StudyPlan(task=args.config or args.task, students=tuple(args.students), seeds=tuple(args.seeds),
                         arms=tuple(args.arms), settings=settings, output_dir=args.output_dir)
        print(run_study(plan))

    run_cli(study)


if __name__ == "__main__":
    main()
