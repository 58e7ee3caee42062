"""Task configs: YAML files in configs/ turned into validated, frozen dataclasses."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kd.errors import UserError
from kd.settings import STUDENT_ARCHS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TASK_CONFIGS = {"A": CONFIG_DIR / "task_a.yaml", "B": CONFIG_DIR / "task_b.yaml"}
DATA_SOURCES = ("digits", "fashion_mnist", "image_folder")
STORAGES = ("auto", "memory", "stream")
MAX_STRIDE_REDUCTION = 3  # halved downsampling layers; more would leave ImageNet models without downsampling


@dataclass(frozen=True)
class Recipe:
    """How to train a teacher from scratch when its checkpoint is missing."""

    epochs: int = 10
    lr: float = 0.002
    weight_decay: float = 0.0005
    batch_size: int = 128
    seed: int = 0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    arch: str
    checkpoint: str
    recipe: Recipe = field(default_factory=Recipe)
    weight: float = 1.0
    mean: tuple[float, ...] | None = None  # None: the task's normalisation
    std: tuple[float, ...] | None = None
    # Where training starts when the checkpoint is missing: False = random weights, True = timm's
    # published weights (downloaded), a path = a local copy of such weights.
    pretrained: bool | str = False
    # first downsampling layers halved for small inputs (kd.models.create_model); None: by the input size
    stride_reduction: int | None = None


@dataclass(frozen=True)
class DataSpec:
    source: str  # one of DATA_SOURCES
    input_size: int
    channels: int
    split_seed: int = 0
    val_size: float = 0.15  # a fraction of the pool, or a count when >= 1
    test_size: float = 0.2  # used only where the source has no official test set
    root: str | None = None  # image_folder: the folder holding train/ [val/] [test/]
    storage: str = "auto"  # image_folder: memory | stream | auto (kd.data.choose_storage)


POLICIES = ("trivialaugment", "randaugment")  # torchvision's automatic augmentation policies (kd.augment)
POLICY_BINS = 31  # magnitude bins of torchvision's policies (their num_magnitude_bins default)
PHOTO_EVAL_CROP = 0.875  # the centre fraction a photo task evaluates on, as timm's and torchvision's recipes


@dataclass(frozen=True)
class AugmentSpec:
    """How training images are augmented (kd.augment): a crop of the zero-padded image (crop_padding) for
    small centred images, or for photos a random-resized crop of crop_scale of the area and crop_ratio
    aspect, with an automatic policy; a horizontal flip with either."""

    crop_padding: int = 0
    hflip: bool = False
    crop_scale: tuple[float, float] | None = None  # None: no random-resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    policy: str | None = None  # one of POLICIES, after the crop and flip
    policy_ops: int = 2  # randaugment: operations per image
    policy_magnitude: int = 9  # randaugment: the magnitude bin of every operation, 0-30
    # the centre fraction of the image that evaluation sees (images are resized to input_size / eval_crop
    # and centre-cropped); None: PHOTO_EVAL_CROP with a random-resized crop, else 1 (the whole image)
    eval_crop: float | None = None

    @property
    def eval_fraction(self) -> float:
        if self.eval_crop is not None:
            return self.eval_crop
        return PHOTO_EVAL_CROP if self.crop_scale else 1.0


@dataclass(frozen=True)
class TaskConfig:
    name: str
    description: str
    data: DataSpec
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentSpec
    teachers: tuple[TeacherSpec, ...]
    # First downsampling layers halved per student (kd.models.create_model); unnamed students: by the
    # input size (kd.builds.default_stride_reduction).
    student_stride_reduction: dict[str, int] = field(default_factory=dict)
    root: Path = CONFIG_DIR.parent  # relative checkpoint paths resolve against this

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def decode_size(self) -> int:
        """The size images are decoded at: the input size, or larger where evaluation centre-crops
        (augment.eval_crop) and training crops at random from the whole decoded image."""
        return math.floor(self.data.input_size / self.augment.eval_fraction)

    def resolve(self, path: str | os.PathLike) -> Path:
        """A path from the config: absolute as given, relative against `root`."""
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def teacher_checkpoint(self, teacher: TeacherSpec) -> Path:
        return self.resolve(teacher.checkpoint)

    def pretrained_weights(self, teacher: TeacherSpec) -> bool | Path:
        """What a missing teacher starts from: False, True (timm's download) or a local weights file."""
        return self.resolve(teacher.pretrained) if isinstance(teacher.pretrained, str) else teacher.pretrained

    @property
    def data_root(self) -> Path | None:
        return None if self.data.root is None else self.resolve(self.data.root)

    def to_dict(self) -> dict:
        """The config in its YAML file layout, with absolute paths: a run's saved copy loads as a task
        config from the run folder, whose own location would otherwise anchor relative paths."""
        out = dataclasses.asdict(self)
        del out["root"]
        out["normalization"] = {"mean": out.pop("mean"), "std": out.pop("std")}
        out["data"]["root"] = None if self.data_root is None else str(self.data_root)
        for entry, spec in zip(out["teachers"], self.teachers):
            entry["checkpoint"] = str(self.teacher_checkpoint(spec))
            weights = self.pretrained_weights(spec)
            entry["pretrained"] = str(weights) if isinstance(weights, Path) else weights
        return out


def _build(cls, raw, where: str, **converters):
    """Make dataclass `cls` from mapping `raw`; unknown or missing keys raise UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    try:
        values = {k: converters[k](v) if k in converters else v for k, v in raw.items()}
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: a value has the wrong type ({err})") from None
    try:
        return cls(**values)
    except TypeError as err:
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in raw and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        raise UserError(f"{where}: missing key(s) {', '.join(missing) or '?'} ({err})") from None


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _optional_floats(values) -> tuple[float, ...] | None:
    return None if values is None else _floats(values)


def _optional_pair(values) -> tuple[float, float] | None:
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or len(values) != 2:
        raise TypeError(f"expected a [low, high] pair, got {values!r}")
    return float(values[0]), float(values[1])


def _stride_reductions(value) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(v, int) and 0 <= v <= MAX_STRIDE_REDUCTION
                                              for v in value.values()):
        raise TypeError(f"student_stride_reduction must map student names to 0-{MAX_STRIDE_REDUCTION}, "
                        f"got {value!r}")
    return {str(name): v for name, v in value.items()}


def _pretrained(value) -> bool | str:
    if not isinstance(value, (bool, str)) or value == "":
        raise TypeError(f"pretrained must be true, false or the path of a weights file, got {value!r}")
    return value


def list_class_folders(folder: Path) -> list[str]:
    """The class folders of an image-folder split, sorted (hidden folders are not classes)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; an image_folder task needs data.root/train/<class>/<images> "
                        "(a relative data.root is resolved against the config file's folder)")
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def parse_task_config(raw: dict, where: str, root: Path = CONFIG_DIR.parent) -> TaskConfig:
    """Validate a task config mapping (as read from YAML)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping at the top level")
    raw = dict(raw)
    norm = raw.pop("normalization", None) or {}
    teachers = raw.pop("teachers", None) or []
    task = _build(
        TaskConfig,
        {**raw, "classes": raw.get("classes") or (), "mean": norm.get("mean"), "std": norm.get("std"),
         "teachers": (), "root": root},
        where,
        data=lambda d: _build(DataSpec, d, f"{where}: data", input_size=int, channels=int),
        augment=lambda a: _build(AugmentSpec, a or {}, f"{where}: augment", crop_scale=_optional_pair,
                                 crop_ratio=_optional_pair),
        classes=lambda names: tuple(str(n) for n in names),  # folder names and metadata are strings
        mean=_floats,
        std=_floats,
        student_stride_reduction=_stride_reductions,
    )
    specs = tuple(
        _build(TeacherSpec, t, f"{where}: teachers[{i}]",
               recipe=lambda r, i=i: _build(Recipe, r or {}, f"{where}: teachers[{i}].recipe"),
               mean=_optional_floats, std=_optional_floats, pretrained=_pretrained)
        for i, t in enumerate(teachers)
    )
    task = dataclasses.replace(task, teachers=specs)
    _check_data(task.data, where)
    if not task.classes:
        task = dataclasses.replace(task, classes=_folder_classes(task, where))
    _check(task, where)
    return task


def _check_data(data: DataSpec, where: str) -> None:
    if data.source not in DATA_SOURCES:
        raise UserError(f"{where}: data.source must be one of {', '.join(DATA_SOURCES)}, got {data.source!r}")
    if data.input_size < 1:
        raise UserError(f"{where}: data.input_size must be a positive number of pixels, got {data.input_size}")
    if data.storage not in STORAGES:
        raise UserError(f"{where}: data.storage must be one of {', '.join(STORAGES)}, got {data.storage!r}")
    if data.source != "image_folder":
        return
    if not data.root:
        raise UserError(f"{where}: data.source image_folder needs data.root, the folder holding train/ val/ test/")
    if data.channels not in (1, 3):
        raise UserError(f"{where}: data.channels must be 1 (grayscale) or 3 (RGB), got {data.channels}")


def augment_problem(spec: AugmentSpec) -> str | None:
    """What is wrong with an augment block (None: nothing)."""
    if spec.crop_padding < 0:
        return f"augment.crop_padding must be >= 0, got {spec.crop_padding}"
    if spec.crop_scale is not None:
        low, high = spec.crop_scale
        if spec.crop_padding:
            return "augment: crop_padding and crop_scale are two kinds of crop; use one"
        if not 0 < low <= high <= 1:
            return f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(spec.crop_scale)}"
    if not 0 < spec.crop_ratio[0] <= spec.crop_ratio[1]:
        return f"augment.crop_ratio must be [low, high] with 0 < low <= high, got {list(spec.crop_ratio)}"
    if spec.policy is not None and spec.policy not in POLICIES:
        return f"augment.policy must be one of {', '.join(POLICIES)} (or left out), got {spec.policy!r}"
    if spec.policy_ops < 1 or not 0 <= spec.policy_magnitude < POLICY_BINS:
        return (f"augment.policy_ops must be >= 1 and policy_magnitude 0-{POLICY_BINS - 1}, got "
                f"{spec.policy_ops} and {spec.policy_magnitude}")
    if spec.eval_crop is not None and not 0 < spec.eval_crop <= 1:
        return f"augment.eval_crop must be in (0, 1], got {spec.eval_crop}"
    if spec.eval_fraction < 1 and spec.crop_scale is None:
        return "augment.eval_crop below 1 needs crop_scale: training would see other images than evaluation"
    return None


def _folder_classes(task: TaskConfig, where: str) -> tuple[str, ...]:
    """Without a `classes` list, an image-folder task's classes are its train/ sub-folders, sorted."""
    if task.data.source != "image_folder":
        raise UserError(f"{where}: missing key classes (only an image_folder task may leave it out)")
    return tuple(list_class_folders(task.data_root / "train"))


def _check(task: TaskConfig, where: str) -> None:
    if problem := augment_problem(task.augment):
        raise UserError(f"{where}: {problem}")
    unknown = sorted(set(task.student_stride_reduction) - set(STUDENT_ARCHS))
    if unknown:
        raise UserError(f"{where}: student_stride_reduction names unknown student(s) {', '.join(unknown)}; "
                        f"students: {', '.join(STUDENT_ARCHS)}")
    if len(task.classes) < 2:
        raise UserError(f"{where}: at least two classes are needed, got {list(task.classes)}")
    if len(set(task.classes)) != len(task.classes):
        raise UserError(f"{where}: class names must be unique, got {list(task.classes)}")
    for stats in [(task.mean, task.std)] + [(t.mean, t.std) for t in task.teachers if t.mean]:
        if len(stats[0]) != task.data.channels or len(stats[1]) != task.data.channels:
            raise UserError(f"{where}: normalization needs one mean and one std per channel "
                            f"({task.data.channels})")
    if not task.teachers:
        raise UserError(f"{where}: a task needs at least one teacher")
    names = [t.name for t in task.teachers]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: teacher names must be unique, got {names}")
    weights = [t.weight for t in task.teachers]
    if not normalisable(weights):
        raise UserError(f"{where}: teacher weights must be >= 0 and not all 0, got {weights}")


def normalisable(weights) -> bool:
    """Teacher weights the KD loss can normalise to sum 1: none negative, not all zero."""
    return min(weights) >= 0 and sum(weights) > 0


def read_yaml(path: Path):
    """A YAML file's contents; a UserError naming the file when it cannot be read or parsed."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable YAML file ({' '.join(str(err).split())})") from None


def load_task_config(task: str) -> TaskConfig:
    """Load task 'A' or 'B' (case-insensitive) or a YAML file by path.

    Relative paths (teacher checkpoints, pretrained weights, data.root) resolve against the
    repository for the built-in tasks and against the config file's folder for any other file.
    """
    builtin = TASK_CONFIGS.get(task.upper())
    path = builtin or Path(task)
    if not path.is_file():
        raise UserError(f"no task config {task!r}: use A, B or the path of a YAML file")
    raw = read_yaml(path)
    # A built-in config named by its path is the same task as its letter: the same teachers, not a second set.
    builtin = builtin or next((p for p in TASK_CONFIGS.values() if p.resolve() == path.resolve()), None)
    return parse_task_config(raw, str(path), root=CONFIG_DIR.parent if builtin else path.resolve().parent)
