import math

import pytest
import torch
import torch.nn.functional as F

from kd.distillers.kd import KD
from kd.losses import compute_teacher_weights, multi_teacher_kd_loss, teacher_target


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=g)
    teachers = torch.randn(3, 4, 5, generator=g) * 2
    targets = torch.tensor([0, 1, 2, 3])
    return student, teachers, targets


def reference_kd(student, teacher_probs, temperature):
    log_q = F.log_softmax(student / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_q, teacher_probs, reduction="batchmean")


def test_alpha_zero_is_cross_entropy(batch):
    student, teachers, targets = batch
    loss = multi_teacher_kd_loss(student, teachers, targets, temperature=3.0, alpha=0.0)
    assert torch.allclose(loss, F.cross_entropy(student, targets))


def test_alpha_one_is_pure_kd_term(batch):
    student, teachers, targets = batch
    loss = multi_teacher_kd_loss(student, teachers, targets, temperature=3.0, alpha=1.0)
    p_t = F.softmax(teachers / 3.0, dim=-1).mean(dim=0)
    assert torch.allclose(loss, reference_kd(student, p_t, 3.0), atol=1e-6)


# Two images, three classes, two teachers: small enough to follow the contract by hand.
STUDENT = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
TEACHERS = [[[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]],  # teacher 0, per image
            [[0.0, 1.5, 1.0], [1.0, -1.0, 2.0]]]  # teacher 1
INDEX_LABELS = [0, 1]
BLENDED_LABELS = [[0.3, 0.7, 0.0], [0.0, 0.4, 0.6]]  # as mixup gives them
LABELS = {"index": ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], torch.tensor(INDEX_LABELS)),
          "blended": (BLENDED_LABELS, torch.tensor(BLENDED_LABELS))}  # (for the reference, for the loss)
WEIGHTS = {"per teacher": [3.0, 1.0], "per image": [[3.0, 1.0], [1.0, 4.0]]}  # unnormalised, as callers give them


def softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(z / temperature) for z in logits]
    return [e / sum(exps) for e in exps]


def contract_loss(labels: list[list[float]], weights: list, temperature: float, alpha: float) -> float:
    """The loss contract in plain Python over STUDENT and TEACHERS, independent of kd.losses:
    (1 - alpha) CE(z_s, y) + alpha T^2 KL(p_T || softmax(z_s / T)), averaged over the batch, with
    p_T = sum_k w_k softmax(z_k / T) and labels as class probabilities (one-hot for index labels)."""
    total = 0.0
    for b, (z_s, y) in enumerate(zip(STUDENT, labels)):
        w = [row[b] if isinstance(row, list) else row for row in weights]
        w = [w_k / sum(w) for w_k in w]
        teacher_probs = [softmax(z_k[b], temperature) for z_k in TEACHERS]
        p_t = [sum(w_k * p_k[c] for w_k, p_k in zip(w, teacher_probs)) for c in range(len(z_s))]
        q = softmax(z_s, temperature)
        kl = sum(p * (math.log(p) - math.log(q_c)) for p, q_c in zip(p_t, q))
        ce = -sum(y_c * math.log(p_c) for y_c, p_c in zip(y, softmax(z_s)))
        total += (1 - alpha) * ce + alpha * temperature ** 2 * kl
    return total / len(STUDENT)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_loss_is_the_contract_written_out(alpha, labels, weights):
    reference_labels, targets = LABELS[labels]
    loss = multi_teacher_kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHERS), targets, temperature=2.0,
                                 alpha=alpha, weights=torch.tensor(WEIGHTS[weights]))
    assert loss.item() == pytest.approx(contract_loss(reference_labels, WEIGHTS[weights], 2.0, alpha), rel=1e-5)


def test_temperature_squared_scaling(batch):
    student, teachers, targets = batch
    for t in (1.0, 2.0, 5.0):
        loss = multi_teacher_kd_loss(student, teachers, targets, temperature=t, alpha=1.0)
        p_t = F.softmax(teachers / t, dim=-1).mean(dim=0)
        kl = F.kl_div(F.log_softmax(student / t, dim=-1), p_t, reduction="batchmean")
        assert torch.allclose(loss, t * t * kl, atol=1e-6)
        assert not torch.allclose(loss, kl) or t == 1.0


def test_identical_teachers_equal_one_teacher(batch):
    student, teachers, targets = batch
    one = multi_teacher_kd_loss(student, teachers[:1], targets, temperature=2.0, alpha=0.5)
    many = multi_teacher_kd_loss(student, teachers[:1].expand(4, -1, -1), targets, temperature=2.0, alpha=0.5)
    assert torch.allclose(one, many, atol=1e-6)


def test_weights_select_teacher(batch):
    student, teachers, targets = batch
    only_second = multi_teacher_kd_loss(student, teachers, targets, temperature=2.0, alpha=1.0,
                                        weights=torch.tensor([0.0, 1.0, 0.0]))
    second = multi_teacher_kd_loss(student, teachers[1:2], targets, temperature=2.0, alpha=1.0)
    assert torch.allclose(only_second, second, atol=1e-6)
    uniform = multi_teacher_kd_loss(student, teachers, targets, temperature=2.0, alpha=1.0)
    assert not torch.allclose(only_second, uniform)


def test_per_sample_weights_and_normalisation(batch):
    _, teachers, _ = batch
    w = torch.tensor([[2.0, 0.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])  # (K, B), unnormalised
    p = teacher_target(teachers, 2.0, w)
    probs = F.softmax(teachers / 2.0, dim=-1)
    assert torch.allclose(p[0], probs[0, 0])
    assert torch.allclose(p[1], probs[1, 1])
    assert torch.allclose(p[2], (probs[0, 2] + probs[1, 2]) / 2)
    assert torch.allclose(p[3], (probs[0, 3] + probs[1, 3] + 2 * probs[2, 3]) / 4)
    assert torch.allclose(p.sum(dim=-1), torch.ones(4))


def test_bad_weights_rejected(batch):
    student, teachers, targets = batch
    with pytest.raises(ValueError):
        multi_teacher_kd_loss(student, teachers, targets, temperature=2.0, alpha=1.0, weights=torch.ones(2))
    with pytest.raises(ValueError):
        multi_teacher_kd_loss(student, teachers, targets, temperature=2.0, alpha=1.0,
                              weights=torch.tensor([1.0, -1.0, 1.0]))


def test_stable_for_extreme_logits():
    student = torch.tensor([[1000.0, -1000.0, 0.0]], requires_grad=True)
    teachers = torch.tensor([[[-1000.0, 1000.0, 0.0]], [[0.0, 0.0, 1000.0]]])
    loss = multi_teacher_kd_loss(student, teachers, torch.tensor([0]), temperature=1.0, alpha=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_kd_loss_zero_when_student_matches_teacher():
    logits = torch.randn(3, 6)
    loss = multi_teacher_kd_loss(logits, logits[None], torch.zeros(3, dtype=torch.long), temperature=4.0, alpha=1.0)
    assert loss.abs().item() < 1e-5


@pytest.mark.parametrize("labels", LABELS)
def test_module_reports_the_contracts_total_and_parts(labels):
    """ce is the hard-label term and kd the T^2-scaled soft term, each as the contract defines it."""
    reference_labels, targets = LABELS[labels]
    student, teachers = torch.tensor(STUDENT), torch.tensor(TEACHERS)
    parts, weights = KD(2.0, 0.3, "fixed", fixed_weights=[3.0, 1.0])(student, targets, teachers)
    expected = {name: contract_loss(reference_labels, [3.0, 1.0], 2.0, alpha)
                for name, alpha in (("total", 0.3), ("ce", 0.0), ("kd", 1.0))}
    assert {name: getattr(parts, name).item() for name in expected} == pytest.approx(expected, rel=1e-5)
    assert weights.tolist() == pytest.approx([0.75, 0.25])
    parts, weights = KD(2.0, 0.0)(student, targets, None)  # no teachers: the hard-label loss alone
    assert weights is None and parts.kd.item() == 0.0
    assert parts.total.item() == pytest.approx(expected["ce"], rel=1e-5)


def test_entropy_weighting_prefers_confident_teacher():
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.0]])
    w = compute_teacher_weights("entropy", torch.stack([unsure, confident]), torch.tensor([0]), 1.0)
    assert w[1, 0] > w[0, 0] and torch.allclose(w.sum(dim=0), torch.ones(1))
    equal = compute_teacher_weights("entropy", torch.stack([confident, confident]), torch.tensor([0]), 1.0)
    assert torch.allclose(equal, torch.full((2, 1), 0.5))


def test_confidence_weighting_matches_ca_mkd():
    right = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    wrong = torch.tensor([[0.0, 5.0], [0.0, 5.0]])
    targets = torch.tensor([0, 1])
    w = compute_teacher_weights("confidence", torch.stack([right, wrong]), targets, 1.0)
    # CA-MKD weighs teacher k by (1 - softmax over teachers of CE_k) / (K - 1). Image 0: CE log(1 + e^-5)
    # for the right teacher and log(1 + e^5) for the wrong one differ by 5, so the right one gets
    # 1 - 1 / (1 + e^5) = 0.9933071; image 1: both equally sure of the true class, a tie
    assert torch.allclose(w, torch.tensor([[0.9933071, 0.5], [0.0066929, 0.5]]), atol=1e-6)


def test_fixed_and_uniform_weighting():
    logits = torch.randn(3, 2, 4)
    w = compute_teacher_weights("fixed", logits, torch.zeros(2, dtype=torch.long), 1.0, fixed=[1.0, 1.0, 2.0])
    assert torch.allclose(w[:, 0], torch.tensor([0.25, 0.25, 0.5]))
    assert torch.allclose(compute_teacher_weights("uniform", logits, None, 1.0), torch.full((3, 2), 1 / 3))
    with pytest.raises(ValueError):
        compute_teacher_weights("nope", logits, None, 1.0)


def test_probability_labels_give_the_same_loss_and_weights_as_indices(batch):
    student, teachers, targets = batch
    onehot = F.one_hot(targets, 5).float()
    for scheme in ("uniform", "confidence"):
        criterion = KD(2.0, 0.4, scheme, label_smoothing=0.1)
        (by_index, w_index), (by_probs, w_probs) = criterion(student, targets, teachers), \
            criterion(student, onehot, teachers)
        assert torch.allclose(by_index.total, by_probs.total) and torch.allclose(w_index, w_probs)


def test_blended_labels_blend_the_cross_entropy(batch):
    """mixup's soft labels: CE(lam a + (1 - lam) b) = lam CE(a) + (1 - lam) CE(b)."""
    student, teachers, targets = batch
    other = targets.flip(0)
    blended = 0.3 * F.one_hot(targets, 5).float() + 0.7 * F.one_hot(other, 5).float()
    loss = multi_teacher_kd_loss(student, teachers, blended, temperature=2.0, alpha=0.0)
    expected = 0.3 * F.cross_entropy(student, targets) + 0.7 * F.cross_entropy(student, other)
    assert torch.allclose(loss, expected)
