"""The scripts' shared argparse pieces: value types (out-of-range values fail in the parser, exit 2) and
the training flags of train.py and tune.py."""

import argparse
import copy

from kd.config import MAX_STRIDE_REDUCTION, STORAGES
from kd.errors import UserError
from kd.settings import LR_SCHEDULES, OPTIMIZERS, TrainSettings, canonical_student_name

DEFAULTS = TrainSettings()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage block stays in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def bounded_float(low: float):
    def parse(text: str) -> float:
        value = _number(text, float)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def unit_interval(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def halvings(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= MAX_STRIDE_REDUCTION:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_STRIDE_REDUCTION}, got {value}")
    return value


def canonical_student(text: str) -> str:
    try:
        return canonical_student_name(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a training run's settings (kd.settings.TrainSettings) that train.py and tune.py share;
    train.py adds those that name one run (--run, --output_dir, --resume, --teachers_only)."""
    from kd.losses import WEIGHTING_SCHEMES

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
    p.add_argument("--device", default=DEFAULTS.device, choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks CUDA, then MPS, then CPU")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=DEFAULTS.amp,
                   help="mixed precision on CUDA (bf16 where supported, else fp16); ignored elsewhere")
    p.add_argument("--data_dir", default=DEFAULTS.data_dir,
                   help="dataset folder (task B: the Fashion-MNIST IDX files, default data/TaskB; an image_folder "
                        "task: instead of its data.root)")
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
                   help="replay cached teacher logits instead of running the teachers every step (each view's "
                        "logits computed the first epoch that trains on it, kept for later runs); auto: when "
                        "they fit the memory budget (streamed data: the disk)")
    p.add_argument("--teacher_cache_views", type=positive_int, default=DEFAULTS.teacher_cache_views,
                   help="augmented views per training image in the cache's view pool; epoch e trains on view e "
                        "mod this (default: the run's epochs, so every epoch sees a view of its own)")
    p.add_argument("--cache_dir", default=DEFAULTS.cache_dir, help="where teacher-logit caches are kept")
    p.add_argument("--data_storage", default=DEFAULTS.data_storage, choices=STORAGES,
                   help="image folders: decode every image into memory, stream them from their files, or auto "
                        "(memory when the decoded splits fit 4 GB); default: the task config's data.storage")
    p.add_argument("--num_workers", type=non_negative_int, default=DEFAULTS.num_workers,
                   help="processes that decode streamed images (default: the CPU count less one, at most 8)")
    p.add_argument("--stride_reduction", type=halvings, default=DEFAULTS.stride_reduction, metavar="{0,1,2,3}",
                   help="how many of the student's first downsampling layers are halved, each doubling every "
                        "later feature map (default: the task config's student_stride_reduction, else 1 below "
                        "64 px and 0 from 64 px on)")
    p.add_argument("--mixup", type=bounded_float(0.0), default=DEFAULTS.mixup, metavar="A",
                   help="blend each training batch with a shuffled copy by lam ~ Beta(A, A), labels too; the "
                        "teachers run online on the blended images (function matching). 0: off; 0.2-1 usual")


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options named on the command line, whatever their value; --config counts as --task too."""
    parser = copy.deepcopy(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    return given | {"task"} if "config" in given else given
