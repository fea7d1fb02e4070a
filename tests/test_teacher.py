"""LCR-BNN (lcr-irnet, lcr-rbnn) and the teacher mechanism it uses.

The binarizers are checked element-wise against the closed forms of IR-Net and RBNN written in
the test modules of those methods (at and near the kinks, p = 0, 0.5, 1); the LCR loss against a
scalar closed form (value and gradients) and against a reference written here with other
primitives (block means for the pooling, einsum for the matrices); the mechanism for a frozen
teacher, the spec's identity and its errors.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_methods import DTYPE, PROGRESS, activation_and_grad, assert_close, assert_exact, elementwise, kink_tensor, sign_scalar
from test_methods_extra import ede, irnet_reference
from test_methods_more import orthogonal, rbnn_reference, rbnn_surrogate, rbnn_t, weight_with
from tiny import tiny_recipe, tiny_run

import bnnbench
from bnnbench import build_model, get_method, list_methods, regularization_loss
from bnnbench.errors import ConfigError
from bnnbench.runners.experiments import Task, plan, run_task
from bnnbench.runners.spec import RunSpec
from bnnbench.runners.teachers import TeacherMissing, find_teacher, load_teacher

LCR = ["lcr-irnet", "lcr-rbnn"]


# ========================================================================= binarizers
def test_lcr_methods_are_registered_with_a_teacher() -> None:
    for name in LCR:
        assert name in list_methods()
        assert get_method(name).teacher
    assert not get_method("irnet").teacher and not get_method("rbnn").teacher
    assert get_method("lcr-irnet").alpha == 8.0 and get_method("lcr-irnet").t_min == 1e-3
    assert get_method("lcr-rbnn").alpha == 3.2 and get_method("lcr-rbnn").t_min == 1e-2


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 7)])
def test_lcr_irnet_weight_is_irnet_with_tmin_1e3(progress: float, shape) -> None:
    w = kink_tensor(shape)
    w[1] = w[1] * 0.05
    out, g, grad = weight_with("lcr-irnet", w, progress, 2, {})
    ref_out, ref_grad = irnet_reference(w, progress, g, t_min=1e-3)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("progress", PROGRESS)
def test_lcr_irnet_activation(progress: float) -> None:
    """k t (1 - tanh^2(t a)), t = 10^(-3 + 4p), k = max(1/t, 1); sign(0) = +1."""
    a = kink_tensor((2, 3, 4, 5))
    out, g, grad = activation_and_grad("lcr-irnet", a, progress)
    assert_exact(out, elementwise(sign_scalar, a))
    assert_close(grad, g * elementwise(ede(progress, t_min=1e-3), a))


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("rotation_grad", ["paper", "upstream"])
def test_lcr_rbnn_weight_is_rbnn(progress: float, rotation_grad: str) -> None:
    w = kink_tensor((4, 3, 3, 3))
    w[1] = w[1] * 0.05
    r1, r2 = orthogonal(3, 3), orthogonal(9, 4)
    theta = torch.tensor([math.pi / 2, 0.3, -1.0, 2.5], dtype=DTYPE).view(-1, 1, 1, 1).requires_grad_(True)
    out, g, grad = weight_with("lcr-rbnn", w, progress, 2, {"r1": r1, "r2": r2, "theta": theta}, rotation_grad=rotation_grad)
    ref_out, ref_grad, ref_theta = rbnn_reference(w, g, r1, r2, theta.detach(), progress, rotation_grad)
    assert_exact(out, ref_out)
    assert_close(grad, ref_grad)
    assert_close(theta.grad, ref_theta)


@pytest.mark.parametrize("progress", PROGRESS)
def test_lcr_rbnn_activation(progress: float) -> None:
    t_a = max(rbnn_t(progress), 1.0)
    edge = math.sqrt(2) / t_a
    a = kink_tensor((2, 3, 4, 5))
    a.view(-1)[-4:] = torch.tensor([edge, -edge, edge - 1e-9, edge + 1e-9], dtype=DTYPE)
    out, g, grad = activation_and_grad("lcr-rbnn", a, progress)
    assert_exact(out, elementwise(sign_scalar, a))
    assert_close(grad, g * elementwise(rbnn_surrogate(1.0, t_a), a))


def test_bad_hyper_parameters_are_refused() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        get_method("lcr-rbnn", alpha=-1.0)
    with pytest.raises(ConfigError, match="teacher_bn"):
        get_method("lcr-irnet", teacher_bn="train")
    assert get_method("lcr-rbnn", alpha=0.0).feature_loss([torch.ones(1, 1, 1, 1)] * 2, [torch.ones(1, 1, 1, 1)] * 2, 2, 0.0, gamma=torch.ones(2)) is None


# ========================================================================= the loss
def scalar_features(values, dtype=DTYPE):
    return [torch.tensor(float(v), dtype=dtype).view(1, 1, 1, 1).requires_grad_(True) for v in values]


@pytest.mark.parametrize("name", LCR)
def test_loss_of_one_by_one_features_is_the_closed_form(name: str) -> None:
    """N = 1, C = H = W = 1: RM = f_i f_{i+1}, K = RM^2, lam = |f_i f_{i+1}|; with three features
    L = alpha/10^4 [(|g0 g1 a b| - |a'b'|)^2 / 4 + (|g1 g2 b c| - |b'c'|)^2 / 2], and its gradients."""
    method = get_method(name)
    a, b, c = scalar_features([0.5, -0.8, 0.3])
    ta, tb, tc = (torch.tensor(v, dtype=DTYPE).view(1, 1, 1, 1) for v in (1.5, 2.0, -0.4))
    gamma = torch.tensor([1.0, 1.2, 0.7], dtype=DTYPE, requires_grad=True)
    loss = method.feature_loss([a, b, c], [ta, tb, tc], 2, 0.5, gamma=gamma)
    A, B, C, G0, G1, G2 = 0.5, -0.8, 0.3, 1.0, 1.2, 0.7
    d0 = abs(G0 * G1 * A * B) - abs(1.5 * 2.0)
    d1 = abs(G1 * G2 * B * C) - abs(2.0 * -0.4)
    s = method.alpha / 1e4
    assert loss.item() == pytest.approx(s * (d0**2 / 4 + d1**2 / 2), rel=1e-12)
    loss.backward()
    sgn = lambda v: math.copysign(1.0, v)  # noqa: E731
    assert float(a.grad) == pytest.approx(s * 2 * d0 / 4 * sgn(A) * abs(G0 * G1 * B), rel=1e-12)
    assert float(b.grad) == pytest.approx(s * (2 * d0 / 4 * sgn(B) * abs(G0 * G1 * A) + 2 * d1 / 2 * sgn(B) * abs(G1 * G2 * C)), rel=1e-12)
    assert float(c.grad) == pytest.approx(s * 2 * d1 / 2 * sgn(C) * abs(G1 * G2 * B), rel=1e-12)
    expected_gamma = [
        s * 2 * d0 / 4 * abs(G1 * A * B),
        s * (2 * d0 / 4 * abs(G0 * A * B) + 2 * d1 / 2 * abs(G2 * B * C)),
        s * 2 * d1 / 2 * abs(G1 * B * C),
    ]
    assert gamma.grad.tolist() == pytest.approx(expected_gamma, rel=1e-12)


def reference_loss(student, teacher, gamma, alpha):
    """alpha / (N 10^4) sum_i mean_N (lam_s - lam_t)^2 / 2^(n-1-i), written with block means and einsum."""

    def lam(f1, f2):
        n, c1, h1, w1 = f1.shape
        h2, w2 = f2.shape[2:]
        if h1 > h2:
            f1 = f1.reshape(n, c1, h2, h1 // h2, w2, w1 // w2).mean(dim=(3, 5))
        rm = torch.einsum("ncp,ndp->ncd", f1.reshape(n, c1, -1), f2.reshape(n, f2.shape[1], -1)) / (h2 * w2)
        k = torch.einsum("ncd,ned->nce", rm, rm)
        return torch.sqrt(torch.sqrt((k.sum(dim=2) ** 2).sum(dim=1)))

    n = len(student)
    scaled = [f * gamma[i] for i, f in enumerate(student)]
    total = sum(((lam(scaled[i], scaled[i + 1]) - lam(teacher[i], teacher[i + 1])) ** 2).mean() / 2 ** (n - 1 - i) for i in range(n - 1))
    return alpha / (student[0].shape[0] * 1e4) * total


def test_loss_of_block_features_matches_the_reference_and_its_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 8, 8), (3, 6, 4, 4), (3, 5, 2, 2), (3, 5, 2, 2)]
    student = [torch.randn(s, generator=gen, dtype=DTYPE).requires_grad_(True) for s in shapes]
    teacher = [torch.randn(s, generator=gen, dtype=DTYPE).relu() for s in shapes]
    gamma = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=DTYPE, requires_grad=True)
    method = get_method("lcr-rbnn")
    loss = method.feature_loss(student, teacher, 2, 0.0, gamma=gamma)
    ref = reference_loss(student, teacher, gamma, method.alpha)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    grads = torch.autograd.grad(loss, [*student, gamma])
    ref_grads = torch.autograd.grad(ref, [*student, gamma])
    for got, want in zip(grads, ref_grads):
        assert_close(got, want)
    inputs = tuple(s.detach().requires_grad_(True) for s in student)
    assert torch.autograd.gradcheck(lambda *f: method.feature_loss(list(f), teacher, 2, 0.0, gamma=gamma.detach()), inputs)


# ========================================================================= the mechanism
def student_and_teacher(net: str = "resnet20", method: str = "lcr-rbnn", **hparams):
    torch.manual_seed(0)
    student = build_model(net, get_method(method, **hparams))
    teacher = build_model(net, "fp")
    bnnbench.attach_teacher(student, teacher)
    return student, teacher


@pytest.mark.parametrize("net,count", [("resnet20", 3), ("resnet18", 4), ("vgg_small", 3)])
def test_backbones_name_their_block_features(net: str, count: int) -> None:
    model = build_model(net, "lcr-rbnn")
    assert len(model.feature_blocks()) == count
    assert model.feature_params["gamma"].tolist() == [1.0] * count
    assert "feature_params.gamma" in model.state_dict()


def test_teacher_is_frozen_and_unchanged_by_a_training_step() -> None:
    student, teacher = student_and_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not any(k.startswith("teacher") for k in student.state_dict())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    student.train()
    x = torch.randn(4, 3, 32, 32)
    logits = student(x)
    reg = regularization_loss(student)
    assert reg is not None and reg.requires_grad
    (torch.nn.functional.cross_entropy(logits, torch.arange(4)) + reg).backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert student.feature_params["gamma"].grad.abs().sum() > 0
    # the teacher's features are its own eval-mode stage outputs on the same batch
    link = student.teacher_link
    with torch.no_grad():
        own = teacher.stages(teacher.stem(x))
    assert torch.equal(link.teacher_features[-1], own)
    assert all(not f.requires_grad for f in link.teacher_features)


def test_batch_statistics_teacher_keeps_its_running_statistics() -> None:
    student, teacher = student_and_teacher(teacher_bn="batch")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.train()
    x = torch.randn(4, 3, 32, 32)
    student(x)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    first_bn = teacher.stem[1]
    with torch.no_grad():
        expected = torch.nn.functional.batch_norm(teacher.stem[0](x), None, None, first_bn.weight, first_bn.bias, training=True)
        got = first_bn(teacher.stem[0](x))
    assert torch.equal(got, expected)


def test_no_feature_term_in_eval_mode_or_without_a_teacher() -> None:
    student, _ = student_and_teacher()
    student.eval()
    student(torch.randn(2, 3, 32, 32))
    assert regularization_loss(student) is None
    alone = build_model("resnet20", "lcr-rbnn")
    alone.train()
    alone(torch.randn(2, 3, 32, 32))
    assert regularization_loss(alone) is None


def test_attach_errors() -> None:
    with pytest.raises(ConfigError, match="no teacher"):
        bnnbench.attach_teacher(build_model("resnet20", "rbnn"), build_model("resnet20", "fp"))
    with pytest.raises(ConfigError, match="backbone"):
        bnnbench.attach_teacher(build_model("resnet20", "lcr-rbnn"), build_model("vgg_small", "fp"))
    with pytest.raises(ConfigError, match="cifar/resnet18 .* the student a cifar/resnet20"):
        bnnbench.attach_teacher(build_model("resnet20", "lcr-rbnn"), build_model("resnet18", "fp"))
    with pytest.raises(ConfigError, match="backbone"):
        bnnbench.attach_teacher(build_model("resnet20", "lcr-rbnn"), build_model("resnet20", "fp", num_classes=7))


# ========================================================================= run identity
def test_spec_identity_includes_the_teacher() -> None:
    spec = RunSpec.make("cifar10", recipe="quick", net="resnet20", method="lcr-rbnn")
    record = spec.to_dict()
    assert record["teacher"]["model"]["method"] == "fp" and record["teacher"]["model"]["net"] == "resnet20"
    assert record["teacher"]["recipe"] == record["recipe"] and record["teacher"]["seed"] == 0
    assert "teacher" in json.loads(spec.key())
    assert RunSpec.from_dict(record).key() == spec.key()
    other = spec.replace(seed=1)
    assert other.teacher_spec.seed == 1 and other.key() != spec.key()
    longer = spec.teacher_spec.replace(recipe=tiny_recipe(epochs=(2, 2)))
    assert spec.replace(teacher=longer).key() != spec.key()
    assert "teacher" not in RunSpec.make("cifar10", recipe="quick", net="resnet20", method="rbnn").to_dict()


def test_spec_refuses_a_wrong_teacher() -> None:
    student = RunSpec.make("cifar10", recipe="quick", net="resnet20", method="lcr-rbnn")
    with pytest.raises(ConfigError, match="backbone"):
        student.replace(teacher=RunSpec.make("cifar10", recipe="quick", net="resnet18", method="fp"))
    with pytest.raises(ConfigError, match="full-precision"):
        student.replace(teacher=RunSpec.make("cifar10", recipe="quick", net="resnet20", method="irnet"))
    with pytest.raises(ConfigError, match="without a teacher"):
        RunSpec.make("cifar10", recipe="quick", net="resnet20", method="rbnn", teacher=student.teacher_spec)


def test_a_student_run_trains_its_teacher_first_and_reuses_it(tmp_path) -> None:
    tiny = tiny_run(tiny_recipe(train=32, test=16, batch=16), tmp_path, method="lcr-rbnn")
    with pytest.raises(TeacherMissing, match="bnnbench run --method fp --net resnet20"):
        find_teacher(tiny.spec, tiny.machine)
    jobs = plan([tiny.spec], [0], tiny.recipe, tiny.machine).jobs
    assert [(job.teacher, job.status) for job in jobs] == [(True, "missing"), (False, "missing")]
    made = run_task(Task(tiny.spec, tiny.machine))
    assert made.path and not made.failed
    config = json.loads((tmp_path / "runs" / made.path.split("/")[-1] / "config.json").read_text())
    teacher_dir = config["resolved"]["teacher"]["run"]
    assert config["resolved"]["teacher"]["checkpoint"] == "stage2_last.pt"
    assert json.loads(json.dumps(config["spec"]["teacher"])) == tiny.spec.teacher_spec.to_dict()
    assert [(job.teacher, job.status) for job in plan([tiny.spec], [0], tiny.recipe, tiny.machine).jobs] == [(False, "finished")]  # done: no teacher job
    assert run_task(Task(tiny.spec, tiny.machine)).reused
    model, info = load_teacher(tiny.spec, tiny.machine, torch.device("cpu"))
    assert info["run"] == teacher_dir and type(model).__name__ == "ResNet"
    # --teacher RUN_DIR: that run, checked against the spec
    given = tiny.machine.replace(teacher_dir=teacher_dir)
    assert find_teacher(tiny.spec, given).path.resolve() == find_teacher(tiny.spec, tiny.machine).path.resolve()
    with pytest.raises(ConfigError, match="but this run's teacher is"):
        find_teacher(tiny.spec.replace(seed=1), given)
    # a finished teacher without its checkpoint (committed runs keep no checkpoints) does not count
    (tmp_path / "runs" / teacher_dir.split("/")[-1] / "stage2_last.pt").unlink()
    with pytest.raises(TeacherMissing, match="final checkpoint"):
        find_teacher(tiny.spec, given)
    with pytest.raises(TeacherMissing, match="no finished teacher run"):
        load_teacher(tiny.spec, tiny.machine, torch.device("cpu"))
    shutil.rmtree(made.path)  # without the student, the plan asks for a teacher again, and not that one
    assert [(job.teacher, job.status) for job in plan([tiny.spec], [0], tiny.recipe, tiny.machine).jobs] == [(True, "missing"), (False, "missing")]


def test_cli_teacher_option(tmp_path, capsys) -> None:
    from bnnbench.cli import main

    assert main(["run", "--method", "lcr-rbnn", "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["run", "--method", "rbnn", "--resume", str(tmp_path), "--teacher", str(tmp_path)]) == 2
    assert "--teacher" in capsys.readouterr().err
