import copy

import pytest
import torch

from conftest import make_config
from dkel.config import TimeScale
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


def test_time_scale_stretches_the_ema_horizon_and_epoch_constants():
    cfg = make_config(method="dkel")
    setup = Setup("resnet8", 10, 1, 3, 30, 12, TimeScale(epoch_factor=0.1, step_factor=0.02))
    method = METHODS.get("dkel")(cfg, setup)
    assert method.alpha == pytest.approx(1 - 1 / 20)  # 1000-step horizon * 0.02
    assert method.rampup_length == pytest.approx(8) and method.beta == pytest.approx(5)
    assert method.decay_horizon == pytest.approx(1)
    assert TimeScale.for_run("auto", 300, 391, 300, 391) == TimeScale(1.0, 1.0)


def test_gradients_never_reach_the_teacher():
    method = build()
    method.prepare(iter(batches(1)))
    views, labels = batches(1)[0]
    out = method.losses(views, labels, epoch=0)
    out.losses["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.student.parameters())
    assert set(out.losses) >= {"loss", "ce_ensemble", "ce_peers", "kd_ensemble", "dk_ensemble", "dk_individual"}


def test_pcl_equals_dkel_with_init_and_decay_switched_off():
    pcl = build("pcl")
    dkel = build("dkel", teacher_init=False, decay="none", dk_rampup=True, ema_warmup=True)
    data = batches(4)
    for m in (pcl, dkel):
        m.prepare(iter(data))
    assert same(params(pcl), params(dkel))
    for step, (views, labels) in enumerate(data):
        epoch = step * 30
        a, b = (m.losses(views, labels, epoch).losses for m in (pcl, dkel))
        assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)
        for m, out in ((pcl, a), (dkel, b)):
            out["loss"].backward()
            with torch.no_grad():
                for p in m.student.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            m.after_step(step)
        assert same(params(pcl), params(dkel))
    assert pcl.mode is None and dkel.mode == "paper"


def test_reports_and_deploys_the_teacher():
    method = build(deploy_peer=2).eval()
    x = torch.randn(5, 1, 8, 8)
    outs = method.eval_logits(x)
    assert set(outs) == {"teacher1", "teacher2", "teacher3", "teacher_ensemble", "student1", "student2",
                         "student3", "student_ensemble"}
    assert method.deploy_metric == "teacher2"
    torch.testing.assert_close(method.deploy().eval()(x), outs["teacher2"], rtol=0, atol=1e-5)
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
