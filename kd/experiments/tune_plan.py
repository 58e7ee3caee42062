"""What a search is asked to do: kept apart from kd.experiments.tuning, so that tune.py takes its flags'
defaults from here without importing Optuna (--help answers at once)."""

from __future__ import annotations

from dataclasses import dataclass

from kd.settings import TrainSettings


@dataclass(frozen=True)
class TunePlan:
    settings: TrainSettings  # what every trial shares; the searched settings are set per trial
    space: dict  # name -> FloatRange | Choices | Fixed, for each name of DEFAULT_SPACE
    trials: int = 20  # finished (complete or pruned) trials the study should hold
    output_dir: str | None = None  # default: evaluation/tune/<study name>
    storage: str | None = None  # default: an SQLite file in the output folder
    study_name: str | None = None  # default: Task<name>_<student>
    sampler_seed: int = 0
    prune: bool = True
    prune_warmup: int | None = None  # epochs every trial trains before it may be pruned; default a quarter
    confirm_seeds: tuple[int, ...] = ()  # retrain tuned and default settings with these seeds, test both
