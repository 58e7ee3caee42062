r"""The multi-teacher knowledge-distillation loss (the `kd` method's, kd.distillers.kd) and the teacher-weighting
schemes every method uses (kd.distillers.base.Distiller).

Contract (alpha is the weight of the teacher term):

    p_T  = sum_k w_k * softmax(z_k / T)      w_k >= 0, sum_k w_k = 1 (per sample for adaptive schemes)
    loss = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(p_T || softmax(z_s / T))     (batch mean)

alpha = 0 trains on hard labels only, alpha = 1 on the teachers' soft targets only. With label
smoothing eps (the teachers' recipes use it), CE is taken against (1 - eps) * onehot(y) + eps / C. The
labels y may also be given as class probabilities (B, C), as mixup blends them; onehot(y) is then y. T^2 keeps
the soft term's gradient magnitude independent of T (Hinton et al., 2015).

Teacher weighting schemes (w has shape (K,) or (K, B)):

- uniform:    w_k = 1 / K
- fixed:      w_k = c_k / sum_j c_j, with user-given c_k >= 0
- entropy:    w_kb = softmax_k(-H(softmax(z_kb / T)))  -- confident (low-entropy) teachers count more
- confidence: w_kb = (1 - softmax_k(CE(z_kb, y_b))) / (K - 1)  -- as in CA-MKD: teachers whose
              cross-entropy on the true label is low count more; w = 1 when K = 1
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kd.settings import WEIGHTING_SCHEMES


def _normalised_weights(weights: torch.Tensor | None, num_teachers: int, batch: int,
                        device) -> torch.Tensor:
    """Return weights of shape (K, B) that sum to 1 over teachers."""
    if weights is None:
        return torch.full((num_teachers, batch), 1.0 / num_teachers, device=device)
    weights = weights.to(device=device, dtype=torch.float32)
    if weights.shape not in ((num_teachers,), (num_teachers, batch)):
        raise ValueError(f"weights must have shape ({num_teachers},) or ({num_teachers}, {batch}), "
                         f"got {tuple(weights.shape)}")
    if weights.dim() == 1:
        weights = weights[:, None].expand(num_teachers, batch)
    if (weights < 0).any():
        raise ValueError("teacher weights must be non-negative")
    return weights / weights.sum(dim=0, keepdim=True)


def teacher_target(teacher_logits: torch.Tensor, temperature: float,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """p_T = sum_k w_k softmax(z_k / T), shape (B, C)."""
    k, b, _ = teacher_logits.shape
    w = _normalised_weights(weights, k, b, teacher_logits.device)
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return (w[:, :, None] * probs).sum(dim=0)


def soft_kd_term(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_T || softmax(z_s / T)), batch mean; xlogy keeps 0 * log 0 = 0."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (torch.xlogy(target_probs, target_probs) - target_probs * log_q).sum(dim=-1)
    return temperature ** 2 * kl.mean()


def multi_teacher_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          targets: torch.Tensor, *, temperature: float, alpha: float,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar loss per the module contract. teacher_logits: (K, B, C); weights: (K,), (K, B) or None."""
    return kd_loss_parts(student_logits, teacher_logits, targets, temperature=temperature,
                         alpha=alpha, weights=weights).total


class LossParts(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor


def kd_loss_parts(student_logits, teacher_logits, targets, *, temperature, alpha, weights=None,
                  label_smoothing: float = 0.0) -> LossParts:
    ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0:
        kd = torch.zeros((), device=student_logits.device)
    else:
        kd = soft_kd_term(student_logits, teacher_target(teacher_logits, temperature, weights), temperature)
    return LossParts((1 - alpha) * ce + alpha * kd, ce.detach(), kd.detach())


def compute_teacher_weights(scheme: str, teacher_logits: torch.Tensor, targets: torch.Tensor,
                            temperature: float, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Weights of shape (K, B), summing to 1 over teachers, for one of WEIGHTING_SCHEMES."""
    k, b, _ = teacher_logits.shape
    logits = teacher_logits.float()
    if scheme == "uniform":
        return torch.full((k, b), 1.0 / k, device=logits.device)
    if scheme == "fixed":
        if fixed is None:
            raise ValueError("the 'fixed' scheme needs teacher weights")
        return _normalised_weights(torch.as_tensor(fixed, dtype=torch.float32), k, b, logits.device)
    if scheme == "entropy":
        log_p = F.log_softmax(logits / temperature, dim=-1)
        entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (K, B)
        return F.softmax(-entropy, dim=0)
    if scheme == "confidence":
        if k == 1:
            return torch.ones((1, b), device=logits.device)
        ce = F.cross_entropy(logits.reshape(k * b, -1), torch.cat([targets] * k), reduction="none").view(k, b)
        return (1 - F.softmax(ce, dim=0)) / (k - 1)
    raise ValueError(f"unknown teacher weighting {scheme!r}; choose one of {', '.join(WEIGHTING_SCHEMES)}")
