"""Distil a task's teachers into a small student: python train.py --task B --alpha 0.6"""

import argparse
import os

from kd.cli import (ArgumentParser, bounded_float, canonical_student, fraction, positive_float, positive_int,
                    unit_interval)
from kd.errors import run_cli
from kd.losses import WEIGHTING_SCHEMES


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Multi-teacher knowledge distillation into a small student.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="B", choices=["A", "B"], type=str.upper,
                   help="A: handwritten digits, B: Fashion-MNIST")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="a task config file; overrides --task (configs/task_template.yaml documents the format)")
    p.add_argument("--lr", type=positive_float, default=0.001, help="learning rate (Adam)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="training batch size")
    p.add_argument("--num_epochs", type=positive_int, default=100, help="student training epochs")
    p.add_argument("--weight_decay", type=bounded_float(0.0), default=0.0005,
                   help="Adam weight decay (L2 penalty added to the gradients)")
    p.add_argument("--temperature", type=positive_float, default=2.0, help="softmax temperature T of the KD term")
    p.add_argument("--alpha", type=unit_interval, default=0.1,
                   help="weight of the teacher term: 0 = hard labels only, 1 = teacher targets only")
    p.add_argument("--scheduler_step", type=positive_int, default=30, help="StepLR: epochs between lr decays")
    p.add_argument("--scheduler_gamma", type=fraction, default=0.5, help="StepLR: lr factor per decay, in (0, 1]")
    p.add_argument("--student_model", type=canonical_student, default="EfficientNet",
                   help="MobileNetV3 | EfficientNet | ResNet18 (case-insensitive)")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--run", default="", help="suffix for the run folder name")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks CUDA, then MPS, then CPU")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA (bf16 where supported, else fp16); ignored elsewhere")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (task B: the Fashion-MNIST IDX files, default data/TaskB; an image_folder "
                        "task: instead of its data.root)")
    p.add_argument("--output_dir", default="runs", help="where run folders are created")
    p.add_argument("--teacher_epochs", type=positive_int, default=None,
                   help="epochs for teachers trained because their checkpoint is missing (default: their recipe)")
    p.add_argument("--teacher_weighting", default="uniform", choices=WEIGHTING_SCHEMES,
                   help="how the teachers' soft targets are combined")
    p.add_argument("--teacher_weights", type=bounded_float(0.0), nargs="+", default=None, metavar="W",
                   help="one weight per teacher for --teacher_weighting fixed (normalised; default: the config's)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format for the student and teachers (measured faster on CPU; "
                        "the usual choice for convnets on GPUs with AMP)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (slow start, faster steps)")
    p.add_argument("--teacher_cache", default="auto", choices=["auto", "on", "off"],
                   help="replay cached teacher logits instead of running the teachers every step; auto: when "
                        "they fit the budget and the cache exists or pays off within this run")
    p.add_argument("--teacher_cache_views", type=positive_int, default=4,
                   help="augmented views per training image in the cache's fixed view pool")
    p.add_argument("--cache_dir", default="cache", help="where teacher-logit caches are kept")
    p.add_argument("--resume", default=None, metavar="auto|RUN",
                   help="continue a run from its checkpoint_last.pt with the settings it was started with: "
                        "a run folder, its checkpoint, or auto (the newest run these flags would name)")
    return p


def main(args: argparse.Namespace) -> None:
    from kd.training import TrainSettings, train_student

    options = vars(args)
    options["task"] = options.pop("config") or options["task"]
    run_dir = train_student(TrainSettings(**options))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from the whole job
        print(run_dir)


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
