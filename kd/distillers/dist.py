"""dist: DIST, "Knowledge Distillation from A Stronger Teacher" (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.distillers.base import Distiller

EPS = 1e-8  # as the authors' code, in the cosine's denominator


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the rows of a and b (the cosine of the centred rows)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


class DIST(Distiller):
    def __init__(self, *, inter_weight: float, intra_weight: float, **common):
        super().__init__(**common)
        self.inter_weight, self.intra_weight = inter_weight, intra_weight

    def teacher_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
        """T^2 * (inter_weight * (1 - mean_b rho(q_b, p_b)) + intra_weight * (1 - mean_c rho(q_:c, p_:c))).

        rho is Pearson's correlation; q = softmax(z_s / T); the inter-class relation correlates each
        image's class probabilities, the intra-class relation each class's probabilities over the batch.
        Matching correlations instead of the probabilities themselves leaves the student free in scale
        and shift, which is what lets a small student learn from a much stronger teacher.

        Several teachers: p is their weighted mean of softened probabilities, p = sum_k w_k softmax(z_k / T),
        as in `kd`: the student correlates with what the teachers agree on, one correlation per image and
        class whatever their number. The intra-class relation needs at least two images in a batch.
        """
        q = F.softmax(student_logits / self.temperature, dim=1)
        p = self.combine(teacher_logits, weights)
        inter = 1 - pearson(q, p).mean()
        intra = 1 - pearson(q.T, p.T).mean()
        return self.temperature ** 2 * (self.inter_weight * inter + self.intra_weight * intra)
