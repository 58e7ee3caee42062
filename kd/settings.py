"""The settings of a training run: one source of truth for train.py's flags and their defaults.

Kept free of torch so that `train.py --help` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd.distillers import method_params
from kd.errors import UserError

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("step", "cosine")
WEIGHTING_SCHEMES = ("uniform", "fixed", "entropy", "confidence")  # how teachers are weighted: kd.losses
# The students (--student_model): the deployment-sized member of each family, by its timm name; see the
# docs/training.md for the measured trade-offs.
STUDENT_ARCHS = {
    "MobileNetV3": "mobilenetv3_small_100",
    "EfficientNet": "efficientnet_b0",
    "ResNet18": "resnet18",
}


def settings_problem(settings: "TrainSettings") -> str | None:
    """What is wrong with the settings together, beyond each flag's own range (None: nothing): teacher
    weights that the weighting would silently leave unused, a warm-up as long as the run, a distillation
    method's unknown or bad parameters."""
    if settings.teacher_weights is not None and settings.teacher_weighting != "fixed":
        return (f"--teacher_weights is used only by --teacher_weighting fixed (this run weights the teachers by "
                f"{settings.teacher_weighting}); add --teacher_weighting fixed or drop the weights")
    if settings.warmup_epochs >= settings.num_epochs:
        return (f"--warmup_epochs {settings.warmup_epochs:g} is not below --num_epochs {settings.num_epochs}: the "
                "rate would never reach --lr")
    try:
        method_params(settings.kd_loss, settings.kd_params)
    except ValueError as err:
        return str(err)
    return None


def canonical_student_name(name: str) -> str:
    """Map a case-insensitive student name to its canonical spelling."""
    for canonical in STUDENT_ARCHS:
        if canonical.lower() == name.lower():
            return canonical
    raise UserError(f"unknown student {name!r}; choose one of {', '.join(STUDENT_ARCHS)}")


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a student training run; train.py's flags map onto these one to one."""

    task: str = "B"  # A, B, or the path of a task config file
    lr: float = 0.001
    batch_size: int = 32
    num_epochs: int = 100
    weight_decay: float = 0.0005
    temperature: float = 2.0
    alpha: float = 0.1
    scheduler_step: int = 30
    scheduler_gamma: float = 0.5
    student_model: str = "EfficientNet"
    seed: int = 42
    run: str = ""
    device: str = "auto"
    amp: bool = True
    data_dir: str | None = None
    output_dir: str = "runs"
    teacher_epochs: int | None = None
    teacher_weighting: str = "uniform"
    teacher_cache: str = "auto"  # auto | on | off
    teacher_cache_views: int | None = None  # None: as many as the run has epochs
    cache_dir: str = "cache"
    resume: str | None = None  # "auto", a run folder, or its checkpoint_last.pt
    teacher_weights: tuple[float, ...] | None = None  # for teacher_weighting="fixed"; default: the config's
    channels_last: bool = True
    compile: bool = False
    label_smoothing: float = 0.0  # of the hard-label term
    optimizer: str = "adam"  # adam | adamw
    lr_schedule: str = "step"  # step (StepLR) | cosine
    data_storage: str | None = None  # auto | memory | stream; None: the task config's data.storage
    num_workers: int | None = None  # decoding processes of streamed data; None: from the CPU count
    stride_reduction: int | None = None  # the student's first downsampling layers halved; None: the task config's
    mixup: float = 0.0  # Beta(a, a) concentration of mixup on every training batch; 0: off
    warmup_epochs: float = 0.0  # the rate's linear rise over the first epochs (kd.engine.Warmup); 0: none
    ema_decay: float = 0.0  # the largest decay of the weights' moving average (kd.engine.WeightAverage); 0: off
    test_time_flip: bool = False  # the student judges each image with its mirror image (kd.models.Normalized)
    dist_timeout: float = 30.0  # torchrun: minutes a process waits at a collective before it fails
    kd_loss: str = "kd"  # the distillation method, a name of kd.distillers.METHODS
    kd_params: tuple[str, ...] = ()  # the method's own parameters, NAME=VALUE; the others at their defaults
    recipe: str | None = None  # the recipe (configs/recipes/NAME.yaml or a file) whose values were the defaults
    pretrained: bool | str = False  # where the student starts: random, timm's published weights, a weights file

    def __post_init__(self):
        # lists (from argparse or a run's config.yaml) become tuples: settings compare equal however made
        for name in ("teacher_weights", "kd_params"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
