"""Task configs: YAML files in configs/ turned into validated, frozen dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kd.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TASK_CONFIGS = {"A": CONFIG_DIR / "task_a.yaml", "B": CONFIG_DIR / "task_b.yaml"}


@dataclass(frozen=True)
class Recipe:
    """How to train a teacher from scratch when its checkpoint is missing."""

    epochs: int = 10
    lr: float = 0.002
    weight_decay: float = 0.0005
    batch_size: int = 128
    seed: int = 0


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    arch: str
    checkpoint: str
    recipe: Recipe = field(default_factory=Recipe)
    weight: float = 1.0
    mean: tuple[float, ...] | None = None  # None: the task's normalisation
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class DataSpec:
    source: str  # "digits" or "fashion_mnist"
    input_size: int
    channels: int
    split_seed: int = 0
    val_size: float = 0.15  # a fraction of the pool, or a count when >= 1
    test_size: float = 0.2  # used only where the source has no official test set


@dataclass(frozen=True)
class AugmentSpec:
    crop_padding: int = 0
    hflip: bool = False


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
    root: Path = CONFIG_DIR.parent  # relative checkpoint paths resolve against this

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def teacher_checkpoint(self, teacher: TeacherSpec) -> Path:
        path = Path(teacher.checkpoint)
        return path if path.is_absolute() else self.root / path

    def to_dict(self) -> dict:
        """The config in its YAML file layout, so a run's saved copy loads as a task config."""
        out = dataclasses.asdict(self)
        del out["root"]
        out["normalization"] = {"mean": out.pop("mean"), "std": out.pop("std")}
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


def parse_task_config(raw: dict, where: str, root: Path = CONFIG_DIR.parent) -> TaskConfig:
    """Validate a task config mapping (as read from YAML)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping at the top level")
    raw = dict(raw)
    norm = raw.pop("normalization", None) or {}
    teachers = raw.pop("teachers", None) or []
    task = _build(
        TaskConfig,
        {**raw, "mean": norm.get("mean"), "std": norm.get("std"), "teachers": (), "root": root},
        where,
        data=lambda d: _build(DataSpec, d, f"{where}: data"),
        augment=lambda a: _build(AugmentSpec, a or {}, f"{where}: augment"),
        classes=tuple,
        mean=_floats,
        std=_floats,
    )
    specs = tuple(
        _build(TeacherSpec, t, f"{where}: teachers[{i}]",
               recipe=lambda r, i=i: _build(Recipe, r or {}, f"{where}: teachers[{i}].recipe"),
               mean=_optional_floats, std=_optional_floats)
        for i, t in enumerate(teachers)
    )
    task = dataclasses.replace(task, teachers=specs)
    _check(task, where)
    return task


def _check(task: TaskConfig, where: str) -> None:
    if task.data.source not in ("digits", "fashion_mnist"):
        raise UserError(f"{where}: data.source must be 'digits' or 'fashion_mnist', got {task.data.source!r}")
    if len(task.classes) < 2:
        raise UserError(f"{where}: at least two classes are needed")
    for stats in [(task.mean, task.std)] + [(t.mean, t.std) for t in task.teachers if t.mean]:
        if len(stats[0]) != task.data.channels or len(stats[1]) != task.data.channels:
            raise UserError(f"{where}: normalization needs one mean and one std per channel "
                            f"({task.data.channels})")
    if not task.teachers:
        raise UserError(f"{where}: a task needs at least one teacher")
    names = [t.name for t in task.teachers]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: teacher names must be unique, got {names}")


def load_task_config(task: str) -> TaskConfig:
    """Load task 'A' or 'B' (case-insensitive) or a YAML file by path.

    Relative teacher checkpoints resolve against the repository for the built-in tasks and
    against the config file's folder for any other file.
    """
    builtin = TASK_CONFIGS.get(task.upper())
    path = builtin or Path(task)
    if not path.is_file():
        raise UserError(f"no task config {task!r}: use A, B or the path of a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable YAML file ({err})") from None
    return parse_task_config(raw, str(path), root=CONFIG_DIR.parent if builtin else path.resolve().parent)
