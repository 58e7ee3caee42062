"""The distillation methods against references written out by hand (plain Python floats, the papers'
formulas), the registry that names them, and the seam: a run picks its method by name."""

import math

import pytest
import torch

from kd.distillers import METHODS, make_distiller, method_params
from kd.distillers.base import Distiller

T = 2.0
STUDENT = [[1.0, -0.5, 2.0, 0.3], [0.2, 1.5, -1.0, 0.0], [0.4, 0.1, 0.3, 1.2]]  # 3 images, 4 classes
TEACHERS = [[[2.0, 0.1, 1.0, -1.0], [0.5, 2.5, 0.0, -0.5], [0.0, -1.0, 1.0, 3.0]],  # teacher 1
            [[0.0, 1.0, 3.0, 0.5], [-1.0, 0.5, 1.0, 2.0], [1.5, 0.5, -0.5, 1.0]]]  # teacher 2
LABELS = [2, 1, 3]
B = len(STUDENT)
WEIGHTS = [0.75, 0.25]  # --teacher_weighting fixed with weights 3 and 1


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def mixture(rows_per_teacher):
    """sum_k w_k softmax(z_k / T) for each image."""
    return [[sum(w * softmax(rows[b], T)[c] for w, rows in zip(WEIGHTS, rows_per_teacher)) for c in range(4)]
            for b in range(B)]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def reference_kd(student, teachers):
    p = mixture(teachers)
    return T * T * sum(kl(p[b], softmax(student[b], T)) for b in range(B)) / B


def reference_dkd(tckd_weight, nckd_weight):
    p, total = mixture(TEACHERS), 0.0
    for b, t in enumerate(LABELS):
        q = softmax(STUDENT[b], T)
        tckd = kl([p[b][t], 1 - p[b][t]], [q[t], 1 - q[t]])
        rest_p = [v / (1 - p[b][t]) for c, v in enumerate(p[b]) if c != t]
        rest_q = [v / (1 - q[t]) for c, v in enumerate(q) if c != t]
        total += tckd_weight * tckd + nckd_weight * kl(rest_p, rest_q)
    return T * T * total / B


def zscore(row):
    mean = sum(row) / len(row)
    sd = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (1e-7 + sd) for v in row]


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)))


def reference_dist(inter_weight, intra_weight):
    p = mixture(TEACHERS)
    q = [softmax(row, T) for row in STUDENT]
    inter = 1 - sum(pearson(q[b], p[b]) for b in range(B)) / B
    intra = 1 - sum(pearson([row[c] for row in q], [row[c] for row in p]) for c in range(4)) / 4
    return T * T * (inter_weight * inter + intra_weight * intra)


def teacher_term(method: str, *pairs: str, labels=None) -> float:
    distiller = make_distiller(method, pairs, temperature=T, alpha=1.0, weighting="fixed", fixed_weights=[3.0, 1.0])
    targets = torch.tensor(LABELS) if labels is None else labels
    parts, weights = distiller(torch.tensor(STUDENT), targets, torch.tensor(TEACHERS))
    assert weights.tolist() == pytest.approx(WEIGHTS)
    assert parts.total.item() == pytest.approx(parts.kd.item())  # alpha 1: the teacher term alone
    return parts.total.item()


def test_kd_is_the_seeds_loss():
    assert teacher_term("kd") == pytest.approx(reference_kd(STUDENT, TEACHERS), rel=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 8.0), (1.0, 0.0), (0.0, 1.0), (2.5, 3.0)])
def test_dkd_weights_its_target_and_non_target_terms_apart(weights):
    tckd, nckd = weights
    got = teacher_term("dkd", f"tckd_weight={tckd}", f"nckd_weight={nckd}")
    assert got == pytest.approx(reference_dkd(tckd, nckd), rel=1e-5)


def test_dkd_decouples_kd_kd_is_tckd_plus_one_minus_p_t_times_nckd():
    """Zhao et al.'s identity, one image at a time (the factor 1 - p_t is per image)."""
    for b in range(B):
        one = (torch.tensor(STUDENT[b:b + 1]), torch.tensor(LABELS[b:b + 1]), torch.tensor(TEACHERS)[:, b:b + 1])

        def term(method, *pairs):
            return make_distiller(method, pairs, temperature=T, alpha=1.0)(*one)[0].total.item()
        p_t = sum(softmax(TEACHERS[k][b], T)[LABELS[b]] for k in range(2)) / 2
        tckd, nckd = term("dkd", "tckd_weight=1", "nckd_weight=0"), term("dkd", "tckd_weight=0", "nckd_weight=1")
        assert term("kd") == pytest.approx(tckd + (1 - p_t) * nckd, rel=1e-5)


def test_dkd_takes_the_larger_part_of_a_mixup_label_as_the_target_class():
    blended = torch.tensor([[0.0, 0.0, 0.7, 0.3], [0.4, 0.6, 0.0, 0.0], [0.0, 0.2, 0.0, 0.8]])  # classes 2, 1, 3
    assert teacher_term("dkd", labels=blended) == pytest.approx(reference_dkd(1.0, 8.0), rel=1e-5)


def test_ls_standardises_every_models_logits_before_the_temperature():
    standardised = [[zscore(row) for row in teacher] for teacher in TEACHERS]
    expected = reference_kd([zscore(row) for row in STUDENT], standardised)
    assert teacher_term("ls") == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(reference_kd(STUDENT, TEACHERS), rel=1e-2)  # it is not kd


def test_ls_is_blind_to_a_teachers_logit_scale_and_shift():
    def term(teachers):
        return make_distiller("ls", (), temperature=T, alpha=1.0)(
            torch.tensor(STUDENT), torch.tensor(LABELS), teachers)[0].total.item()
    teachers = torch.tensor(TEACHERS)
    rescaled = torch.stack([teachers[0] * 5.0 + 3.0, teachers[1]])
    assert term(rescaled) == pytest.approx(term(teachers), rel=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.0), (0.0, 0.5)])
def test_dist_matches_inter_and_intra_class_correlations(weights):
    inter, intra = weights
    got = teacher_term("dist", f"inter_weight={inter}", f"intra_weight={intra}")
    assert got == pytest.approx(reference_dist(inter, intra), rel=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_keeps_alphas_meaning_and_trains(method):
    student = torch.tensor(STUDENT, requires_grad=True)
    labels, teachers = torch.tensor(LABELS), torch.tensor(TEACHERS)
    ce = torch.nn.functional.cross_entropy(student, labels).item()
    labels_only = make_distiller(method, (), temperature=T, alpha=0.0)
    parts, weights = labels_only(student, labels, teachers)
    assert parts.total.item() == pytest.approx(ce) and parts.kd.item() == 0 and weights is None
    term = make_distiller(method, (), temperature=T, alpha=1.0)(student, labels, teachers)[0].total.item()
    mixed = make_distiller(method, (), temperature=T, alpha=0.3)(student, labels, teachers)[0]
    assert mixed.total.item() == pytest.approx(0.7 * ce + 0.3 * term, rel=1e-5)
    mixed.total.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_the_registry_names_each_method_its_class_and_parameters():
    for name, method in METHODS.items():
        distiller = make_distiller(name, (), temperature=T, alpha=0.5)
        assert isinstance(distiller, Distiller)
        for param, spec in method.params.items():
            assert getattr(distiller, param) == spec.default
    assert method_params("dkd", ["nckd_weight=2"]) == {"tckd_weight": 1.0, "nckd_weight": 2.0}
    for method, pairs, message in [("kd", ["beta=1"], "kd takes NAME=VALUE with NAME one of: none"),
                                   ("dkd", ["nckd_weight"], "dkd takes NAME=VALUE"),
                                   ("dkd", ["nckd_weight=x"], "'x' is not a number"),
                                   ("dist", ["inter_weight=-1"], "inter_weight must be >= 0"),
                                   ("mkd", [], "unknown distillation method 'mkd'")]:
        with pytest.raises(ValueError, match=message):
            method_params(method, pairs)


def test_train_py_refuses_a_methods_bad_parameter_in_one_line(capsys):
    import train

    with pytest.raises(SystemExit) as exit_:
        train.main(["--task", "A", "--kd_loss", "dist", "--kd_params", "intra_weight=-2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "intra_weight must be >= 0" in err


def test_a_run_distils_with_the_method_it_names_records_it_and_resumes_with_it(tmp_path, tiny_teachers, tiny_students,
                                                                               capsys, monkeypatch):
    from kd.record import read_record
    from tests.conftest import run_in_process, write_task

    config = write_task(tmp_path, tiny_teachers)
    args = ["--config", str(config), "--alpha", "0.5", "--student_model", "MobileNetV3", "--batch_size", "256",
            "--device", "cpu", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "runs"),
            "--kd_loss", "dkd", "--kd_params", "nckd_weight=4"]
    built = []
    original = make_distiller

    def record_method(method, pairs=(), **common):
        built.append((method, tuple(pairs)))
        return original(method, pairs, **common)
    monkeypatch.setattr("kd.training.make_distiller", record_method)
    run_dir = run_in_process(args + ["--num_epochs", "1"], capsys)
    assert built == [("dkd", ("nckd_weight=4",))]
    settings = read_record(run_dir).settings
    assert (settings.kd_loss, tuple(settings.kd_params)) == ("dkd", ("nckd_weight=4",))
    import train

    train.main(args[:-4] + ["--kd_loss", "dist", "--num_epochs", "2", "--resume", str(run_dir)])
    assert built[-1] == ("dkd", ("nckd_weight=4",))  # the run's own method, not the flag's
    assert "--kd_loss dist (run: dkd)" in capsys.readouterr().err
