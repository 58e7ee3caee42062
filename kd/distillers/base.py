"""The seam every distillation method fills: the student's loss from its logits, the labels and the
teachers' logits, whichever method runs (kd.engine.train_one_epoch knows no more of it)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.losses import LossParts, compute_teacher_weights, teacher_target
from kd.settings import WEIGHTING_SCHEMES


class Distiller(nn.Module):
    """loss = (1 - alpha) * CE(z_s, y) + alpha * teacher_term(z_s, z_teachers, w, y)     (batch mean)

    alpha keeps the seed's meaning for every method: 0 = hard labels only (the teachers are not run),
    1 = the teacher term only. The teachers' weights w (K, B) come from the weighting scheme (kd.losses:
    uniform, fixed, entropy, confidence) and sum to 1 over teachers for each image; how a method
    combines its teachers with them is its `teacher_term`'s docstring. y are index labels (B,) or, under
    mixup, probability labels (B, C); CE takes either, with label smoothing eps. Returns the loss parts
    and the batch's mean weight per teacher (for the log), None without teachers.
    """

    def __init__(self, temperature: float, alpha: float, weighting: str = "uniform", fixed_weights=None,
                 label_smoothing: float = 0.0):
        super().__init__()
        if weighting not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown teacher weighting {weighting!r}")
        self.temperature, self.alpha, self.weighting = temperature, alpha, weighting
        self.fixed_weights, self.label_smoothing = fixed_weights, label_smoothing

    @property
    def uses_teachers(self) -> bool:
        return self.alpha > 0

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> tuple[LossParts, torch.Tensor | None]:
        ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)
        if teacher_logits is None or not self.uses_teachers:
            zero = torch.zeros((), device=student_logits.device)
            return LossParts((1 - self.alpha) * ce, ce.detach(), zero), None
        weights = compute_teacher_weights(self.weighting, teacher_logits, targets, self.temperature,
                                          self.fixed_weights)
        term = self.teacher_term(student_logits.float(), teacher_logits.float(), weights, targets)
        parts = LossParts((1 - self.alpha) * ce + self.alpha * term, ce.detach(), term.detach())
        return parts, weights.mean(dim=1).detach()

    def teacher_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
        """The teacher term (a scalar, batch mean) from the student's logits (B, C), the teachers' (K, B, C),
        their weights (K, B) and the labels."""
        raise NotImplementedError

    def teacher_probabilities(self, teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The teachers' combined target (B, C) as this method forms it, weighted as in training: what
        evaluation scores as "the ensemble". By default sum_k w_k softmax(z_k / T)."""
        weights = compute_teacher_weights(self.weighting, teacher_logits, targets, self.temperature,
                                          self.fixed_weights)
        return self.combine(teacher_logits.float(), weights)

    def combine(self, teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k w_k softmax(z_k / T), (B, C); a method that forms its target otherwise overrides this."""
        return teacher_target(teacher_logits, self.temperature, weights)


def class_indices(targets: torch.Tensor) -> torch.Tensor:
    """Index labels (B,): the labels themselves, or under mixup the larger part's class."""
    return targets if targets.dim() == 1 else targets.argmax(dim=1)
