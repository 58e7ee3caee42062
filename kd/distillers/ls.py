"""ls: KD on standardised logits (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024)."""

from __future__ import annotations

import torch

from kd.distillers.base import Distiller
from kd.losses import soft_kd_term, teacher_target

EPS = 1e-7  # as the authors' code: (z - mean) / (eps + std)


def standardise(logits: torch.Tensor) -> torch.Tensor:
    """Each row z-scored over the classes (the sample standard deviation, as in the authors' code)."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (EPS + logits.std(dim=-1, keepdim=True))


class LogitStandardisedKD(Distiller):
    def teacher_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(p_T || softmax(Z(z_s) / T)), p_T = sum_k w_k softmax(Z(z_k) / T), Z the z-score per image.

        The student need only match the teachers' logits up to a shift and a scale: what a temperature
        shared by two models of different logit ranges cannot give. Several teachers: each one's logits
        are standardised on their own before they are softened and averaged with the weights, which puts
        teachers whose logits have different scales (another architecture, label smoothing, longer
        training) on one footing in the mixture. The weights themselves (entropy, confidence) are
        computed from the raw logits, as for every method.
        """
        return soft_kd_term(standardise(student_logits), self.combine(teacher_logits, weights), self.temperature)

    def combine(self, teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k w_k softmax(Z(z_k) / T): each teacher standardised on its own."""
        return teacher_target(standardise(teacher_logits), self.temperature, weights)
