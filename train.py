"""Distil a task's teachers into a small student: python train.py --task B --alpha 0.6"""

import argparse
import os
import sys

from kd.cli import (ArgumentParser, bounded_float, canonical_student, fraction, positive_float, positive_int,
                    unit_interval)
from kd.errors import run_cli
from kd.losses import WEIGHTING_SCHEMES
from kd.settings import LR_SCHEDULES, OPTIMIZERS, TrainSettings

DEFAULTS = TrainSettings()


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Multi-teacher knowledge distillation into a small student.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()  # one task source: two at once is an error
    source.add_argument("--task", default=DEFAULTS.task, choices=["A", "B"], type=str.upper,
                   help="A: handwritten digits, B: Fashion-MNIST")
    source.add_argument("--config", default=None, metavar="YAML",
                   help="a task config file instead of --task (configs/task_template.yaml documents the format)")
    p.add_argument("--lr", type=positive_float, default=DEFAULTS.lr, help="learning rate")
    p.add_argument("--batch_size", type=positive_int, default=DEFAULTS.batch_size, help="training batch size")
    p.add_argument("--num_epochs", type=positive_int, default=DEFAULTS.num_epochs, help="student training epochs")
    p.add_argument("--weight_decay", type=bounded_float(0.0), default=DEFAULTS.weight_decay,
                   help="Adam weight decay (L2 penalty added to the gradients)")
    p.add_argument("--temperature", type=positive_float, default=DEFAULTS.temperature,
                   help="softmax temperature T of the KD term")
    p.add_argument("--alpha", type=unit_interval, default=DEFAULTS.alpha,
                   help="weight of the teacher term: 0 = hard labels only, 1 = teacher targets only")
    p.add_argument("--scheduler_step", type=positive_int, default=DEFAULTS.scheduler_step,
                   help="StepLR: epochs between lr decays")
    p.add_argument("--scheduler_gamma", type=fraction, default=DEFAULTS.scheduler_gamma,
                   help="StepLR: lr factor per decay, in (0, 1]")
    p.add_argument("--student_model", type=canonical_student, default=DEFAULTS.student_model,
                   help="MobileNetV3 | EfficientNet | ResNet18 (case-insensitive)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed")
    p.add_argument("--run", default=DEFAULTS.run, help="suffix for the run folder name")
    p.add_argument("--device", default=DEFAULTS.device, choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks CUDA, then MPS, then CPU")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=DEFAULTS.amp,
                   help="mixed precision on CUDA (bf16 where supported, else fp16); ignored elsewhere")
    p.add_argument("--data_dir", default=DEFAULTS.data_dir,
                   help="dataset folder (task B: the Fashion-MNIST IDX files, default data/TaskB; an image_folder "
                        "task: instead of its data.root)")
    p.add_argument("--output_dir", default=DEFAULTS.output_dir, help="where run folders are created")
    p.add_argument("--teacher_epochs", type=positive_int, default=DEFAULTS.teacher_epochs,
                   help="epochs for teachers trained because their checkpoint is missing (default: their recipe)")
    p.add_argument("--teacher_weighting", default=DEFAULTS.teacher_weighting, choices=WEIGHTING_SCHEMES,
                   help="how the teachers' soft targets are combined")
    p.add_argument("--teacher_weights", type=bounded_float(0.0), nargs="+", default=DEFAULTS.teacher_weights,
                   metavar="W",
                   help="one weight per teacher for --teacher_weighting fixed (normalised; default: the config's)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=DEFAULTS.channels_last,
                   help="channels-last memory format for the student and teachers (measured faster on CPU; "
                        "the usual choice for convnets on GPUs with AMP)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (slow start, faster steps)")
    p.add_argument("--label_smoothing", type=unit_interval, default=DEFAULTS.label_smoothing,
                   help="label smoothing of the hard-label cross-entropy (the teachers' recipes use 0.1)")
    p.add_argument("--optimizer", default=DEFAULTS.optimizer, choices=OPTIMIZERS,
                   help="adam: weight decay added to the gradients (L2); adamw: decoupled weight decay")
    p.add_argument("--lr_schedule", default=DEFAULTS.lr_schedule, choices=LR_SCHEDULES,
                   help="step: StepLR with --scheduler_step/--scheduler_gamma; cosine: decay to 0 over --num_epochs")
    p.add_argument("--teacher_cache", default=DEFAULTS.teacher_cache, choices=["auto", "on", "off"],
                   help="replay cached teacher logits instead of running the teachers every step; auto: when "
                        "they fit the budget and the cache exists or pays off within this run")
    p.add_argument("--teacher_cache_views", type=positive_int, default=DEFAULTS.teacher_cache_views,
                   help="augmented views per training image in the cache's fixed view pool")
    p.add_argument("--cache_dir", default=DEFAULTS.cache_dir, help="where teacher-logit caches are kept")
    p.add_argument("--teachers_only", action="store_true",
                   help="train the task's missing teachers (or load them), report their accuracy, and stop")
    p.add_argument("--resume", default=DEFAULTS.resume, metavar="auto|RUN",
                   help="continue a run from its checkpoint_last.pt with the settings it was started with "
                        "(a larger --num_epochs trains on): a run folder, its checkpoint, or auto (the newest "
                        "run these flags would name)")
    return p


def given_flags(argv: list[str]) -> set[str]:
    """The settings named on the command line, whatever their value (a resumed run warns about them)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    return given | {"task"} if "config" in given else given


def main(argv: list[str]) -> None:
    from kd.training import TrainSettings, train_student, train_teachers

    options = vars(get_args_parser().parse_args(argv))
    options["task"] = options.pop("config") or options["task"]
    if options.pop("teachers_only"):
        run_dir = train_teachers(TrainSettings(**options))
    else:
        run_dir = train_student(TrainSettings(**options), given=given_flags(argv))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from the whole job
        print(run_dir)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
