"""Distillation methods: one class in one file each, and this registry, which names them.

A method is a `kd.distillers.base.Distiller` subclass that turns the student's logits, the labels and
the teachers' logits into the teacher term of the loss. The registry is all the rest of the project
knows of it: train.py's --kd_loss choices and --kd_params, config.yaml and --resume (through the run's
settings), the study's arms (benchmarks/kd_study.py) and tune.py's search space read the names and
parameters here. Kept free of torch, so that train.py --help answers at once; `make_distiller` imports
a method's module only when a run uses it. Adding a method: docs/design.md, "Adding a distillation method".
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Param:
    """A method's own hyper-parameter: a number >= `minimum`, with its default."""

    default: float
    help: str
    minimum: float = 0.0


@dataclass(frozen=True)
class Method:
    target: str  # "module:Class" of its Distiller
    summary: str
    params: dict[str, Param] = field(default_factory=dict)


METHODS = {
    "kd": Method("kd.distillers.kd:KD", "Hinton et al. (2015): KL to the teachers' weighted mean of softened "
                                        "probabilities (the default)"),
    "dkd": Method("kd.distillers.dkd:DKD", "decoupled KD (Zhao et al., CVPR 2022): target-class and "
                                           "non-target-class terms, weighted apart",
                  {"tckd_weight": Param(1.0, "weight of the target-class term (DKD's alpha)"),
                   "nckd_weight": Param(8.0, "weight of the non-target-class term (DKD's beta)")}),
    "ls": Method("kd.distillers.ls:LogitStandardisedKD", "KD on z-scored logits (Sun et al., CVPR 2024): each "
                                                         "model's logits standardised before the temperature"),
    "dist": Method("kd.distillers.dist:DIST", "DIST (Huang et al., NeurIPS 2022): inter- and intra-class "
                                              "correlation of the probabilities",
                   {"inter_weight": Param(1.0, "weight of the inter-class (per image) relation (DIST's beta)"),
                    "intra_weight": Param(1.0, "weight of the intra-class (per class) relation (DIST's gamma)")}),
}


def method_params(method: str, pairs: Sequence[str]) -> dict[str, float]:
    """The method's parameters: its defaults, with NAME=VALUE `pairs` applied; a ValueError (one line)
    for an unknown method, name or value."""
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}")
    params = METHODS[method].params
    values = {name: p.default for name, p in params.items()}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in params:
            known = ", ".join(params) or "none"
            raise ValueError(f"--kd_params {pair!r}: {method} takes NAME=VALUE with NAME one of: {known}")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--kd_params {pair!r}: {text!r} is not a number") from None
        if not value >= params[name].minimum:
            raise ValueError(f"--kd_params {pair!r}: {name} must be >= {params[name].minimum:g}")
        values[name] = value
    return values


def make_distiller(method: str, pairs: Sequence[str] = (), **common):
    """The method's Distiller with its parameters (`pairs`, NAME=VALUE) and the common ones (temperature,
    alpha, weighting, fixed_weights, label_smoothing: see kd.distillers.base.Distiller)."""
    params = method_params(method, pairs)
    module, _, name = METHODS[method].target.partition(":")
    return getattr(importlib.import_module(module), name)(**common, **params)
