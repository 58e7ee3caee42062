"""dkd: decoupled knowledge distillation (Zhao et al., CVPR 2022; mdistiller's dkd_loss is the reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.distillers.base import Distiller, class_indices


class DKD(Distiller):
    def __init__(self, *, tckd_weight: float, nckd_weight: float, **common):
        super().__init__(**common)
        self.tckd_weight, self.nckd_weight = tckd_weight, nckd_weight

    def teacher_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
        """T^2 * (tckd_weight * TCKD + nckd_weight * NCKD), batch mean.

        With p the teachers' softened target and q = softmax(z_s / T), t the image's class:
        TCKD = KL([p_t, 1 - p_t] || [q_t, 1 - q_t]), the binary target-vs-rest term, and NCKD = KL(p' || q'),
        p' and q' the distributions over the other classes renormalised. KD itself is
        TCKD + (1 - p_t) * NCKD: DKD frees the non-target term from the (1 - p_t) that shrinks it exactly
        where the teacher is confident.

        Several teachers: p is their weighted mean of softened probabilities, p = sum_k w_k softmax(z_k / T),
        as in `kd`, and is then decoupled. The identity above holds for that mixture, so dkd with weights
        (1, 1 - p_t) is kd, and the cost per step does not grow with the number of teachers. Under mixup the
        target class is the larger part's.
        """
        t = self.temperature
        target = F.one_hot(class_indices(targets), student_logits.shape[1]).bool()
        p = self.combine(teacher_logits, weights)
        p_t = p.masked_select(target)
        log_q = F.log_softmax(student_logits / t, dim=1)
        others = (student_logits / t).masked_fill(target, float("-inf"))
        log_rest_q = torch.logsumexp(others, dim=1) - torch.logsumexp(student_logits / t, dim=1)  # log(1 - q_t)
        tckd = _kl_pair(p_t, 1 - p_t, log_q.masked_select(target), log_rest_q)
        p_other = p.masked_fill(target, 0.0) / (1 - p_t).clamp_min(1e-12)[:, None]
        log_q_other = (others - torch.logsumexp(others, dim=1, keepdim=True)).masked_fill(target, 0.0)
        nckd = (torch.xlogy(p_other, p_other) - p_other * log_q_other).sum(dim=1)
        return t ** 2 * (self.tckd_weight * tckd + self.nckd_weight * nckd).mean()


def _kl_pair(p_a: torch.Tensor, p_b: torch.Tensor, log_q_a: torch.Tensor, log_q_b: torch.Tensor) -> torch.Tensor:
    """KL([p_a, p_b] || [q_a, q_b]) per image, from the q's logarithms; 0 log 0 = 0."""
    return torch.xlogy(p_a, p_a) - p_a * log_q_a + torch.xlogy(p_b, p_b) - p_b * log_q_b
