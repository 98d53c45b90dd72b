"""DKEL and PCL at the method level: teacher initialisation, EMA, which teacher teaches whom,
PCL against SPEC section 3, deployment, and the end-of-epoch instruments."""
import copy
import math

import pytest
import torch

from conftest import make_config
from dkel import losses as L
from dkel import runtime
from dkel.config import TimeScale
from dkel.engine import Stepper
from dkel.methods import METHODS, Setup


def build(name="dkel", peers=3, **values):
    cfg = make_config(method=name, peers=peers, **values)
    torch.manual_seed(0)
    setup = Setup("resnet8", 10, 1, peers, cfg.epochs, 12, TimeScale())
    return METHODS.get(name)(cfg, setup)


def batches(n, peers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(peers, 16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in b)


def manual_init(teacher, data, lr, weight_decay, peers=3):
    """Plain SGD on (1/K) sum_j CE(T_j(x_j), y), written out."""
    teacher = copy.deepcopy(teacher).train().requires_grad_(True)
    for views, labels in data:
        loss = sum(torch.nn.functional.cross_entropy(z, labels) for z in teacher(views).logits) / peers
        grads = torch.autograd.grad(loss, list(teacher.parameters()))
        with torch.no_grad():
            for p, g in zip(teacher.parameters(), grads):
                p -= lr * (g + weight_decay * p)
    return teacher


@pytest.mark.parametrize("mode,k,steps,lr", [("paper", 1, 1, 0.01), ("paper", 3, 3, 0.01),
                                             ("reference", 1, 2, 0.1 / 100), ("reference", 2, 3, 0.1 / 100)])
def test_teacher_init_runs_exactly_k_steps_at_its_lr(mode, k, steps, lr):
    method = build(mode=mode, init_steps=k)
    student_before = params(method.student)
    teacher_before = copy.deepcopy(method.teacher)
    assert same(params(teacher_before), {k_: v for k_, v in student_before.items() if not k_.startswith("head")})
    data = batches(6)
    stream = iter(data)
    method.prepare(stream)
    assert len(list(stream)) == 6 - steps  # consumed exactly `steps` batches
    expected = manual_init(teacher_before, data[:steps], lr, 5e-4)
    for (name, p), q in zip(method.teacher.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert same(params(method.student), student_before)  # the student is untouched
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_no_teacher_init_switch():
    method = build(teacher_init=False)
    before = params(method.teacher)
    method.prepare(iter(batches(3)))
    assert same(params(method.teacher), before)


def test_reference_teacher_equals_student_after_step_zero():
    method = build(mode="reference", init_steps=2)
    method.prepare(iter(batches(3)))
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p))
    method.after_step(0)  # alpha_0 = min(1 - 1/1, 0.999) = 0
    student = dict(method.student.named_parameters())
    for name, p in method.teacher.named_parameters():
        assert torch.equal(p, student[name]), name


def test_paper_teacher_keeps_alpha_to_the_t_of_its_initial_weights():
    method = build(init_steps=1)
    method.prepare(iter(batches(1)))
    t0 = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    with torch.no_grad():
        for p in method.student.parameters():
            p.copy_(torch.randn_like(p))
    s = {n: p.detach().clone() for n, p in method.student.named_parameters()}
    for t in range(1, 6):
        method.after_step(t - 1)
        keep = 0.999 ** t
        for name, p in method.teacher.named_parameters():
            torch.testing.assert_close(p, keep * t0[name] + (1 - keep) * s[name], rtol=1e-5, atol=1e-6)
    assert method.alpha == 0.999 and not method.warmup


def stepper_for(method):
    return Stepper(method.cfg, method, runtime.setup("cpu", "fp32", False))


def perturbed_teacher(method, scale=0.3):
    """Moves the teacher away from the student (at construction both hold the same weights)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return method


def test_a_step_moves_the_teacher_only_by_ema_and_its_own_batchnorm_statistics():
    """The teacher is not trained by the optimizer, runs its forward in train mode (its BN statistics
    follow its own batches) and averages parameters only, not BN buffers (SPEC section 1, EMA)."""
    method = build(init_steps=1)
    init, (views, labels) = batches(2)
    method.prepare(iter([init]))
    stepper = stepper_for(method)
    method.train()
    before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    own_forward = copy.deepcopy(method.teacher)
    with torch.no_grad():
        own_forward(views)  # what the teacher's own train-mode forward does to its BN statistics
    assert not all(torch.equal(a, b) for a, b in zip(own_forward.buffers(), method.teacher.buffers()))
    stepper(views, labels, 0)
    student = dict(method.student.named_parameters())
    for name, p in method.teacher.named_parameters():
        torch.testing.assert_close(p, 0.999 * before[name] + 0.001 * student[name], rtol=1e-6, atol=1e-7, msg=name)
    for (name, b), expected in zip(method.teacher.named_buffers(), own_forward.buffers()):
        assert torch.equal(b, expected), name
    assert all(p.grad is None for p in method.teacher.parameters())


def spec_loss(z, z_e, t, y, r, w, dk):
    """SPEC section 2/3 with loops over peers, float64 (PCL: w = 0, dk = r)."""
    def ce(a):
        return float(torch.nn.functional.cross_entropy(a.double(), y))

    def kd(a, b):
        return float(L.kd_loss(a.double(), b.double()))

    k = len(z)
    total = ce(z_e)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        individual = sum(kd(z[i], t[j]) for j in others) / (k - 1)
        ensemble = kd(z[i], sum(t[j] for j in others) / (k - 1))
        total += ce(z[i]) + r * kd(z[i], z_e) + dk * (w * ensemble + (1 - w) * individual)
    return total


def test_pcl_is_spec_section_3():
    """No initialisation, the mean-teacher warm-up (the teacher is the running mean of the student's
    iterates), w = 0 and the teacher term ramped like the peer-ensemble term."""
    pcl = build("pcl")
    data = batches(3)
    pcl.prepare(iter(data))
    assert same(params(pcl.teacher), {k: v for k, v in params(pcl.student).items() if not k.startswith("head")})
    iterates = []
    for step, ((views, labels), epoch) in enumerate(zip(data, (0, 30, 90))):
        with torch.no_grad():
            out = copy.deepcopy(pcl.student)(views)
            t = copy.deepcopy(pcl.teacher)(views).logits
        r = math.exp(-5 * (1 - epoch / 80) ** 2) if epoch < 80 else 1.0
        got = pcl.losses(views, labels, epoch).losses["loss"]
        assert got.item() == pytest.approx(spec_loss(out.logits, out.ensemble, t, labels, r, 0.0, r), rel=1e-5)
        got.backward()
        with torch.no_grad():
            for p in pcl.student.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        pcl.after_step(step)
        iterates.append({n: p.detach().clone() for n, p in pcl.student.named_parameters()})
        for name, p in pcl.teacher.named_parameters():
            mean = sum(it[name] for it in iterates) / len(iterates)
            torch.testing.assert_close(p, mean, rtol=1e-5, atol=1e-6, msg=name)
    assert pcl.mode is None and pcl.initial_teacher_weight() == 0.0


def test_student_peer_i_learns_from_teacher_peers_j_on_their_own_views():
    """DK_i uses teacher peer j evaluated on view j, for every j != i (SPEC section 2)."""
    method = perturbed_teacher(build())
    views, labels = batches(1, seed=3)[0]
    k = 3
    with torch.no_grad():  # plain networks: student peer i on view i, teacher peer j on view j
        z = torch.stack([method.student.deploy(i + 1).train()(views[i]) for i in range(k)])
        t = torch.stack([method.teacher.deploy(j + 1).train()(views[j]) for j in range(k)])
    individual = sum(L.kd_loss(z[i], t[j]) for i in range(k) for j in range(k) if j != i) / (k - 1)
    ensemble = sum(L.kd_loss(z[i], (t.sum(0) - t[i]) / (k - 1)) for i in range(k))
    got = method.losses(views, labels, 0).losses  # w = 1 at epoch 0: both terms are computed
    torch.testing.assert_close(got["dk_individual"], individual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["dk_ensemble"], ensemble, rtol=1e-5, atol=1e-6)


def test_instruments_leave_every_state_as_it_was_and_measure_the_teacher():
    method = build(init_steps=1)
    data = batches(4)
    method.prepare(iter(data[:1]))
    stepper = stepper_for(method)
    method.train()
    for views, labels in data[1:]:
        stepper(views, labels, 0)
    before = params(method)
    probe = batches(1, seed=9)[0]
    out = method.epoch_diagnostics(probe, 0.5)
    assert same(params(method), before)  # weights and BN statistics untouched
    assert out["init_teacher_weight"] == pytest.approx(0.999 ** 3)
    shares = {k: v for k, v in out.items() if k.startswith("grad_share_")}
    assert set(shares) == {"grad_share_ce_peers", "grad_share_kd_ensemble", "grad_share_dk_ensemble",
                           "grad_share_dk_individual"}
    assert sum(shares.values()) == pytest.approx(1.0) and shares["grad_share_dk_individual"] == 0.0  # w = 1
    views, labels = probe
    with torch.no_grad():  # every teacher peer on view 1, as plain networks
        shared = torch.stack([method.teacher.deploy(j + 1).train()(views[0]).argmax(-1) for j in range(3)])
    pairs = [(shared[i] == shared[j]).float().mean().item() for i in range(3) for j in range(3) if i != j]
    assert out["probe_agree_teacher_peers"] == pytest.approx(sum(pairs) / len(pairs))


def test_instruments_see_a_teacher_that_copies_its_student():
    """After PCL's first step (alpha_0 = 0) the teacher equals its student: agreement 1, KL 0."""
    pcl = build("pcl")
    stepper = stepper_for(pcl)
    pcl.train()
    views, labels = batches(1)[0]
    stepper(views, labels, 0)
    out = pcl.epoch_diagnostics(batches(1, seed=4)[0], 0.0)
    assert out["probe_agree_student_teacher"] == 1.0
    assert out["probe_kl_student_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert out["init_teacher_weight"] == 0.0


def test_reports_and_deploys_the_teacher():
    method = perturbed_teacher(build(deploy_peer=2)).eval()
    x = torch.randn(5, 1, 8, 8)
    outs = method.eval_logits(x)
    assert set(outs) == {"teacher1", "teacher2", "teacher3", "teacher_ensemble", "student1", "student2",
                         "student3", "student_ensemble"}
    assert method.deploy_metric == "teacher2"
    with torch.no_grad():
        deployed = method.deploy().eval()(x)
        torch.testing.assert_close(outs["teacher2"], method.teacher.deploy(2).eval()(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(outs["student2"], method.student.deploy(2).eval()(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(deployed, outs["teacher2"], rtol=0, atol=1e-5)
    assert (deployed - outs["student2"]).abs().max() > 0.1  # the teacher differs from its student here
    assert (deployed - outs["teacher1"]).abs().max() > 0.1
    assert method.peer_groups()["teacher"] == ["teacher1", "teacher2", "teacher3"]


@pytest.mark.parametrize("values,message", [
    ({"mode": "papper"}, "mode must be one of paper, reference"),
    ({"decay": "sigmoid"}, "decay must be one of"),
    ({"ema_alpha": 1.0}, "ema_alpha must be in"),
    ({"deploy_peer": 4}, "deploy_peer must be in 1..3"),
])
def test_impossible_hyperparameters(values, message):
    from dkel.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        METHODS.get("dkel").check(make_config(method="dkel", **values))


@pytest.mark.parametrize("mode,k,steps", [("paper", 5, 5), ("reference", 1, 2)])
def test_teacher_init_takes_exactly_its_steps_when_an_epoch_is_shorter(mode, k, steps):
    """With one batch per epoch, the initialisation keeps drawing from further (unused) epochs."""
    from dkel.data import ViewLoader, load_dataset

    data = load_dataset("digits", train_subset=100)
    loader = ViewLoader(data.train_images, data.train_labels, batch_size=128, views=3, pad=1, flip=False,
                        mean=data.mean, std=data.std, seed=0)
    assert len(loader) == 1
    drawn = []

    def counted(stream):
        for batch in stream:
            drawn.append(batch)
            yield batch

    method = build(mode=mode, init_steps=k)
    method.prepare(counted(loader.stream(-1)))
    assert len(drawn) == steps
    assert not torch.equal(drawn[0][0], drawn[-1][0]) or steps == 1
