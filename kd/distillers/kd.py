"""kd: the seed's loss (Hinton et al., 2015), the default method."""

from __future__ import annotations

import torch

from kd.distillers.base import Distiller
from kd.losses import soft_kd_term


class KD(Distiller):
    def teacher_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(p_T || softmax(z_s / T)) with p_T = sum_k w_k softmax(z_k / T).

        Several teachers: their softened probabilities are averaged with the weights, and the student
        matches that mixture (one KL per image, whatever the number of teachers), as the loss contract
        in kd.losses and DESIGN say.
        """
        return soft_kd_term(student_logits, self.combine(teacher_logits, weights), self.temperature)
