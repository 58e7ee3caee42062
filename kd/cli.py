"""The scripts' shared argparse pieces: value types (out-of-range values fail in the parser, exit 2) and
the training flags of train.py and tune.py."""

import argparse
import copy
import dataclasses
import shlex
from collections.abc import Collection
from pathlib import Path

from kd.config import CONFIG_DIR, MAX_STRIDE_REDUCTION, STORAGES, read_yaml
from kd.distillers import METHODS
from kd.errors import UserError
from kd.settings import LR_SCHEDULES, OPTIMIZERS, WEIGHTING_SCHEMES, TrainSettings, canonical_student_name

DEFAULTS = TrainSettings()
TASKS = ("A", "B")  # the built-in tasks; any other is a config file


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


def decay_rate(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
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


def add_training_arguments(p: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """The flags of a training run's settings (kd.settings.TrainSettings), defined once for every script:
    --task or --config, and the flags of `names` (default: all that train.py and tune.py share; train.py
    adds those that name one run: --run, --output_dir, --resume, --teachers_only)."""
    def add(flag: str, **options) -> None:
        if names is None or flag[2:] in names:
            p.add_argument(flag, **options)

    source = p.add_mutually_exclusive_group()  # one task source: two at once is an error
    source.add_argument("--task", default=DEFAULTS.task, choices=TASKS, type=str.upper,
                        help="A: handwritten digits, B: Fashion-MNIST")
    source.add_argument("--config", default=None, metavar="YAML",
                        help="a task config file instead of --task (configs/task_template.yaml documents the format)")
    add("--lr", type=positive_float, default=DEFAULTS.lr, help="learning rate")
    add("--batch_size", type=positive_int, default=DEFAULTS.batch_size, help="training batch size")
    add("--num_epochs", type=positive_int, default=DEFAULTS.num_epochs, help="student training epochs")
    add("--weight_decay", type=bounded_float(0.0), default=DEFAULTS.weight_decay,
                   help="Adam weight decay (L2 penalty added to the gradients)")
    add("--temperature", type=positive_float, default=DEFAULTS.temperature,
                   help="softmax temperature T of the KD term")
    add("--alpha", type=unit_interval, default=DEFAULTS.alpha,
                   help="weight of the teacher term: 0 = hard labels only, 1 = teacher targets only")
    add("--scheduler_step", type=positive_int, default=DEFAULTS.scheduler_step,
                   help="StepLR: epochs between lr decays")
    add("--scheduler_gamma", type=fraction, default=DEFAULTS.scheduler_gamma,
                   help="StepLR: lr factor per decay, in (0, 1]")
    add("--student_model", type=canonical_student, default=DEFAULTS.student_model,
                   help="MobileNetV3 | EfficientNet | ResNet18 (case-insensitive)")
    add("--seed", type=int, default=DEFAULTS.seed, help="random seed")
    add("--device", default=DEFAULTS.device, choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks CUDA, then MPS, then CPU")
    add("--amp", action=argparse.BooleanOptionalAction, default=DEFAULTS.amp,
                   help="mixed precision on CUDA (bf16 where supported, else fp16); ignored elsewhere")
    add("--data_dir", default=DEFAULTS.data_dir,
                   help="dataset folder (task B: the Fashion-MNIST IDX files, default data/TaskB; an image_folder "
                        "task: instead of its data.root)")
    add("--teacher_epochs", type=positive_int, default=DEFAULTS.teacher_epochs,
                   help="epochs for teachers trained because their checkpoint is missing (default: their recipe)")
    add("--teacher_weighting", default=DEFAULTS.teacher_weighting, choices=WEIGHTING_SCHEMES,
                   help="how the teachers' soft targets are combined")
    add("--teacher_weights", type=bounded_float(0.0), nargs="+", default=DEFAULTS.teacher_weights,
                   metavar="W",
                   help="one weight per teacher for --teacher_weighting fixed (normalised; default: the config's)")
    add("--channels_last", action=argparse.BooleanOptionalAction, default=DEFAULTS.channels_last,
                   help="channels-last memory format for the student and teachers (measured faster on CPU; "
                        "the usual choice for convnets on GPUs with AMP)")
    add("--compile", action="store_true", help="torch.compile the student (slow start, faster steps)")
    add("--label_smoothing", type=unit_interval, default=DEFAULTS.label_smoothing,
                   help="label smoothing of the hard-label cross-entropy (the teachers' recipes use 0.1)")
    add("--optimizer", default=DEFAULTS.optimizer, choices=OPTIMIZERS,
                   help="adam: weight decay added to the gradients (L2); adamw: decoupled weight decay")
    add("--lr_schedule", default=DEFAULTS.lr_schedule, choices=LR_SCHEDULES,
                   help="step: StepLR with --scheduler_step/--scheduler_gamma; cosine: decay to 0 over --num_epochs")
    add("--teacher_cache", default=DEFAULTS.teacher_cache, choices=["auto", "on", "off"],
                   help="replay cached teacher logits instead of running the teachers every step (each view's "
                        "logits computed the first epoch that trains on it, kept for later runs); auto: when "
                        "they fit the memory budget (streamed data: the disk)")
    add("--teacher_cache_views", type=positive_int, default=DEFAULTS.teacher_cache_views,
                   help="augmented views per training image in the cache's view pool; epoch e trains on view e "
                        "mod this (default: the run's epochs, so every epoch sees a view of its own)")
    add("--cache_dir", default=DEFAULTS.cache_dir, help="where teacher-logit caches are kept")
    add("--data_storage", default=DEFAULTS.data_storage, choices=STORAGES,
                   help="image folders: decode every image into memory, stream them from their files, or auto "
                        "(memory when the decoded splits fit 4 GB); default: the task config's data.storage")
    add("--num_workers", type=non_negative_int, default=DEFAULTS.num_workers,
                   help="processes that decode streamed images (default: the CPU count less one, at most 8)")
    add("--stride_reduction", type=halvings, default=DEFAULTS.stride_reduction, metavar="{0,1,2,3}",
                   help="how many of the student's first downsampling layers are halved, each doubling every "
                        "later feature map (default: the task config's student_stride_reduction, else 1 below "
                        "64 px and 0 from 64 px on)")
    add("--dist_timeout", type=positive_float, default=DEFAULTS.dist_timeout, metavar="MINUTES",
                   help="torchrun: how long a process waits for the others at a collective (process 0 computing "
                        "a view of the logit cache, a slow epoch) before the run fails with an error")
    add("--kd_loss", default=DEFAULTS.kd_loss, choices=list(METHODS),
        help="the distillation method: " + "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()))
    add("--kd_params", nargs="+", default=DEFAULTS.kd_params, metavar="NAME=VALUE",
        help="the method's own parameters (the rest at their defaults): " + "; ".join(
            f"{name}: " + ", ".join(f"{p} (default {spec.default:g}: {spec.help})" for p, spec in m.params.items())
            for name, m in METHODS.items() if m.params))
    add("--pretrained", nargs="?", const=True, default=DEFAULTS.pretrained, metavar="FILE",
        help="start the student from timm's published weights (downloaded: needs internet) or, given a FILE, "
             "from a local weights file of its architecture (.safetensors, .pth); its classifier is replaced "
             "and starts at zero")
    add("--mixup", type=bounded_float(0.0), default=DEFAULTS.mixup, metavar="A",
                   help="blend each training image with another by lam ~ Beta(A, A), labels too; the teachers' "
                        "targets are those of the blends, cached like any view (function matching). 0: off; "
                        "0.2-1 usual")
    add("--warmup_epochs", type=bounded_float(0.0), default=DEFAULTS.warmup_epochs, metavar="E",
        help="raise the learning rate linearly from --lr / steps to the schedule's rate over the first E epochs "
             "(fractions allowed), step by step; with --lr_schedule cosine, a one-cycle schedule. 0: none")
    add("--ema_decay", type=decay_rate, default=DEFAULTS.ema_decay, metavar="D",
        help="validate, keep and test a moving average of the student's weights, updated after every step; "
             "its decay ramps up as 1 - (1 + step)^-0.75 (0.99 after 460 steps, 0.999 after 10,000) and stops "
             "at D; 0: off")
    add("--test_time_flip", action="store_true",
        help="the student judges each image together with its mirror image (the mean of the two predictions) in "
             "validation, test, evaluation, predict and the exported files: twice the inference cost; only for "
             "tasks that train with flips")


def add_output_dir(p: argparse.ArgumentParser, help: str) -> None:
    """--output_dir, the one name every script gives its output folder; --output, its name in release 0.2,
    is still accepted (until the next release)."""
    p.add_argument("--output_dir", "--output", dest="output_dir", default=None, help=help)


RECIPE_DIR = CONFIG_DIR / "recipes"
NOT_IN_RECIPES = ("task", "config", "recipe", "resume", "teachers_only", "help")  # what names one run, or the recipe


class RecipeError(Exception):
    """A recipe value the parser refused (raised by the copy of the parser that reads a recipe)."""


def recipe_path(name: str) -> Path | None:
    """A shipped recipe by name (configs/recipes/NAME.yaml), else a YAML file by path; None if neither."""
    for path in (RECIPE_DIR / f"{name}.yaml", Path(name)):
        if path.is_file():
            return path
    return None


def parse_with_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with --recipe's values as the defaults: a YAML file of flag values, as timm's -c args
    file; the command line still wins. A missing recipe, an unknown key or a bad value is one line
    (exit 2), as on the command line."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--recipe", default=None)
    name = first.parse_known_args(argv)[0].recipe
    if name is not None:
        parser.set_defaults(**read_recipe(parser, name))
    return parser.parse_args(argv)


def read_recipe(parser: argparse.ArgumentParser, name: str) -> dict:
    """The recipe's values, each checked by its flag's own type, range and choices."""
    path = recipe_path(name)
    if path is None:
        shipped = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        parser.error(f"--recipe {name}: no such recipe (shipped: {shipped}; or the path of a YAML file)")
    try:
        raw = read_yaml(path) or {}
    except UserError as err:
        parser.error(f"--recipe {err}")
    if not isinstance(raw, dict):
        parser.error(f"--recipe {path}: expected a mapping of flag: value")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_IN_RECIPES}
    unknown = sorted(set(raw) - set(actions))
    if unknown:
        parser.error(f"--recipe {path}: unknown key(s) {', '.join(map(str, unknown))}; a recipe holds train.py flag "
                     "values by their names (lr: 0.002), not --task, --config or --resume")
    checker = copy.deepcopy(parser)
    for action in checker._actions:
        action.default = argparse.SUPPRESS

    def refuse(message):
        raise RecipeError(message)
    checker.error = refuse
    try:
        values = vars(checker.parse_args([token for key, value in raw.items()
                                          for token in _flag_tokens(actions[key], value)]))
    except RecipeError as err:
        parser.error(f"--recipe {path}: {err}")
    return values


def _flag_tokens(action: argparse.Action, value) -> list[str]:
    """The command-line tokens that give `action` the recipe's `value`."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction) and isinstance(value, bool):
        return [flag] if value else [f"--no-{flag[2:]}"]
    if isinstance(value, bool) and (isinstance(action, argparse._StoreTrueAction) or action.nargs == "?"):
        return [flag] if value else []  # an optional value (--pretrained [FILE]): the bare flag is true
    values = value if isinstance(value, list) else [value]
    return [flag, *map(str, values)]


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options named on the command line, whatever their value; --config counts as --task too."""
    parser = copy.deepcopy(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    return given | {"task"} if "config" in given else given


def train_command(settings: TrainSettings) -> str:
    """The train.py command line that trains `settings`: the task, and every setting that differs from the
    defaults (a task's default command trains its missing teachers too)."""
    defaults, parts = TrainSettings(), ["python", "train.py"]
    for field in dataclasses.fields(TrainSettings):
        value = getattr(settings, field.name)
        if field.name == "task":
            parts += ["--task", value.upper()] if value.upper() in TASKS else ["--config", value]
        elif field.name in ("run", "output_dir", "resume") or value == getattr(defaults, field.name):
            continue
        elif isinstance(value, bool):
            parts.append(f"--{field.name}" if value else f"--no-{field.name}")
        elif isinstance(value, (list, tuple)):
            parts += [f"--{field.name}", *map(str, value)]
        elif value is not None:
            parts += [f"--{field.name}", str(value)]
    return shlex.join(parts)
