"""The SPEC section 4 baselines: DML, CL, ONE, OKDDip, KDCL.

Loss values are checked against independent numpy references written with explicit loops
over peers and samples; gradients against closed forms; every method trains through the
real engine and builds for every registered model."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dkel import losses, models
from dkel.config import TimeScale, load_yaml, resolve
from dkel.errors import ConfigError
from dkel.methods import METHODS, Setup, method_configs

BASELINES = ("dml", "cl", "one", "okddip", "kdcl")
TAU = 3.0
REPO = Path(__file__).resolve().parents[1]

# small fixed logits: K=3 peers, B=2 samples, C=4 classes
Z3 = np.array([[[2.0, -1.0, 0.5, 0.0], [0.3, 1.2, -0.7, 2.2]],
               [[1.0, 0.0, -0.5, 1.5], [-1.0, 0.4, 0.9, 0.1]],
               [[-0.2, 2.5, 0.3, -1.1], [1.7, -0.3, 0.0, 0.6]]])
Y = np.array([0, 3])


# ----------------------------------------------------------------------------- numpy references
def softmax(v, tau=1.0):
    e = np.exp((v - v.max()) / tau)
    return e / e.sum()


def ce_ref(z, y):
    """Batch-mean cross-entropy of one peer's [B, C] logits."""
    return np.mean([-math.log(softmax(z[b])[y[b]]) for b in range(len(y))])


def kd_ref(student, teacher, tau=TAU):
    """tau^2 * mean_b sum_c q log(q / p) with q = softmax(teacher / tau), p = softmax(student / tau)."""
    total = 0.0
    for b in range(student.shape[0]):
        q, p = softmax(teacher[b], tau), softmax(student[b], tau)
        total += sum(q[c] * math.log(q[c] / p[c]) for c in range(len(q)))
    return tau ** 2 * total / student.shape[0]


def logits_for(k, seed=0, b=5, c=6):
    if k == 3:
        return Z3, Y
    rng = np.random.default_rng(seed + k)
    return rng.normal(scale=2.0, size=(k, b, c)), rng.integers(0, c, size=b)


def t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def close(value, expected):
    return float(value) == pytest.approx(float(expected), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- loss values
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("tau_squared", [True, False])
def test_dml_loss_value(k, tau_squared):
    z, y = logits_for(k)
    expected = 0.0
    for i in range(k):
        kd = sum(kd_ref(z[i], z[j]) for j in range(k) if j != i) / (k - 1)
        expected += ce_ref(z[i], y) + (kd if tau_squared else kd / TAU ** 2)
    got = losses.dml_loss(t(z), torch.tensor(y), temperature=TAU, tau_squared=tau_squared)
    assert close(got["loss"], expected)
    assert close(got["ce_peers"], sum(ce_ref(z[i], y) for i in range(k)))


def test_dml_paper_setting_is_plain_kl_at_tau_one():
    z, y = logits_for(3)
    got = losses.dml_loss(t(z), torch.tensor(y), temperature=1.0, tau_squared=False)["kd_peers"]
    expected = sum(kd_ref(z[i], z[j], 1.0) for i in range(3) for j in range(3) if j != i) / 2
    assert close(got, expected)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_cl_loss_value(k):
    z, y = logits_for(k)
    r = 0.37
    expected = 0.0
    for h in range(k):
        others = sum(z[j] for j in range(k) if j != h) / (k - 1)
        expected += ce_ref(z[h], y) + r * kd_ref(z[h], others)
    assert close(losses.cl_loss(t(z), torch.tensor(y), kd_weight=r, temperature=TAU)["loss"], expected)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_one_loss_value(k):
    z, y = logits_for(k)
    gate = np.random.default_rng(k).dirichlet(np.ones(k), size=z.shape[1])  # [B, K]
    ensemble = np.zeros(z.shape[1:])
    for b in range(z.shape[1]):
        for i in range(k):
            ensemble[b] += gate[b, i] * z[i, b]
    assert np.allclose(losses.gated_ensemble(t(z), t(gate)).numpy(), ensemble, rtol=1e-12)
    r = 0.6
    expected = sum(ce_ref(z[i], y) + r * kd_ref(z[i], ensemble) for i in range(k)) + ce_ref(ensemble, y)
    got = losses.one_loss(t(z), t(ensemble), torch.tensor(y), kd_weight=r, temperature=TAU)
    assert close(got["loss"], expected)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_okddip_loss_value(k):
    z, y = logits_for(k)
    rng = np.random.default_rng(10 + k)
    q, key = rng.normal(size=(k, z.shape[1], 2)), rng.normal(size=(k, z.shape[1], 2))
    leader = rng.normal(size=z.shape[1:])
    targets = np.zeros_like(z)
    for b in range(z.shape[1]):
        for a in range(k):
            alpha = softmax(np.array([q[a, b] @ key[c, b] for c in range(k)]))
            targets[a, b] = sum(alpha[c] * z[c, b] for c in range(k))
    alpha_t = losses.attention_weights(t(q), t(key))
    got_targets = losses.attention_targets(t(z), alpha_t)
    assert np.allclose(got_targets.numpy(), targets, rtol=1e-12)
    r = 0.8
    expected = (sum(ce_ref(z[a], y) + r * kd_ref(z[a], targets[a]) for a in range(k)) + ce_ref(leader, y)
                + r * kd_ref(leader, z.mean(0)))
    got = losses.okddip_loss(t(z), t(leader), got_targets, torch.tensor(y), kd_weight=r, temperature=TAU)
    assert close(got["loss"], expected)


def test_kdcl_minlogit_worked_example():
    # two peers, two samples, three classes; labels 0 and 2
    z = np.array([[[3.0, 1.0, 0.0], [0.5, 2.0, 1.0]],
                  [[2.0, 2.5, -1.0], [1.0, 0.0, 4.0]]])
    y = np.array([0, 2])
    # subtract each peer's true-class logit:
    #   peer 1: [0, -2, -3], [-0.5, 1, 0]      peer 2: [0, 0.5, -3], [-3, -4, 0]
    # elementwise minimum over the peers:
    expected = np.array([[0.0, -2.0, -3.0], [-3.0, -4.0, 0.0]])
    got = losses.minlogit_ensemble(t(z), torch.tensor(y))
    assert np.array_equal(got.numpy(), expected)
    # the true class is 0 in every row of the MinLogit teacher, every other entry <= 0
    assert (got.numpy() <= 0).all()


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("ensemble", ["minlogit", "naive"])
def test_kdcl_loss_value(k, ensemble):
    z, y = logits_for(k)
    teacher = np.zeros(z.shape[1:])
    for b in range(z.shape[1]):
        for c in range(z.shape[2]):
            if ensemble == "minlogit":
                teacher[b, c] = min(z[i, b, c] - z[i, b, y[b]] for i in range(k))
            else:
                teacher[b, c] = sum(z[i, b, c] for i in range(k)) / k
    expected = sum(ce_ref(z[i], y) + kd_ref(z[i], teacher) for i in range(k))
    got = losses.kdcl_loss(t(z), torch.tensor(y), ensemble=ensemble, temperature=TAU)
    assert close(got["loss"], expected)


def test_kdcl_rejects_unknown_ensemble():
    with pytest.raises(ValueError, match="minlogit"):
        losses.kdcl_loss(t(Z3), torch.tensor(Y), ensemble="mean")


# ----------------------------------------------------------------------------- gradients
def soft(z, tau=TAU):
    return torch.softmax(z.detach() / tau, dim=-1)


@pytest.mark.parametrize("k", [2, 4])
def test_dml_targets_get_no_gradient(k):
    z, y = logits_for(k)
    zt = t(z, grad=True)
    (grad,) = torch.autograd.grad(losses.dml_loss(zt, torch.tensor(y))["kd_peers"], zt)
    # d/dz_k of KD(z_k, sg(z_l)) is tau/B (p_k - q_l); a target with a gradient would add terms
    batch = z.shape[1]
    p = soft(zt)
    expected = TAU / batch * (p - (p.sum(0, keepdim=True) - p) / (k - 1))
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ensemble", ["minlogit", "naive"])
def test_kdcl_teacher_gets_no_gradient(ensemble):
    z, y = logits_for(4)
    zt = t(z, grad=True)
    (grad,) = torch.autograd.grad(losses.kdcl_loss(zt, torch.tensor(y), ensemble=ensemble)["kd_peers"], zt)
    teacher = losses.minlogit_ensemble(zt, torch.tensor(y)) if ensemble == "minlogit" else zt.mean(0)
    expected = TAU / z.shape[1] * (soft(zt) - soft(teacher)[None])
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-12)


def test_cl_and_one_targets_get_no_gradient():
    z, y = logits_for(3)
    zt = t(z, grad=True)
    (grad,) = torch.autograd.grad(losses.cl_loss(zt, torch.tensor(y), kd_weight=1.0)["kd_peers"], zt)
    expected = TAU / z.shape[1] * (soft(zt) - soft(losses.others_mean(zt)))
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-12)
    ens = t(z.mean(0), grad=True)
    kd = losses.one_loss(zt, ens, torch.tensor(y), kd_weight=1.0)["kd_peers"]
    assert torch.autograd.grad(kd, ens, allow_unused=True)[0] is None


def test_okddip_leader_target_detached_attention_targets_not():
    z, y = logits_for(3)
    zt, leader = t(z, grad=True), t(z[0], grad=True)
    targets = t(z[::-1].copy(), grad=True)
    out = losses.okddip_loss(zt, leader, targets, torch.tensor(y), kd_weight=1.0)
    # the leader's distillation reaches the leader only, not the auxiliary peers it learns from
    assert torch.autograd.grad(out["kd_leader"], zt, allow_unused=True)[0] is None
    assert torch.autograd.grad(out["kd_peers"], targets)[0].abs().sum() > 0


def build(method, model="resnet8", peers=3, classes=10, **options):
    cfg = resolve([("test", {"method": method, "model": model, "peers": peers, **options})], method_configs())
    cls = METHODS.get(method)
    cls.check(cfg)
    setup = Setup(model, classes, 3, peers, 300, 391, TimeScale())
    torch.manual_seed(0)
    return cls(cfg, setup)


def batch(method, peers, size=32, b=4, classes=10):
    views = torch.randn(method.view_count(method.cfg), b, 3, size, size, generator=torch.Generator().manual_seed(1))
    return views, torch.arange(b) % classes


def test_okddip_attention_projections_get_gradient():
    method = build("okddip")
    views, labels = batch(method, 3)
    method.losses(views, labels, 100)[0]["loss"].backward()
    for proj in (method.student.query, method.student.key):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [2, 3, 4])
def test_cl_trunk_gradient_is_one_over_k(k):
    method = build("cl", peers=k)
    plain = copy.deepcopy(method.student)
    plain.trunk_grad_scale = 1.0
    views, labels = batch(method, k)
    for student in (method.student, plain):
        logits = student(views).logits
        losses.cl_loss(logits, labels, kd_weight=0.5)["loss"].backward()
    for (name, scaled), unscaled in zip(method.student.named_parameters(), plain.parameters()):
        ratio = 1.0 / k if name.startswith("trunk.") else 1.0
        assert torch.allclose(scaled.grad, unscaled.grad * ratio, rtol=1e-4, atol=1e-7), name


def test_cl_rescaling_can_be_switched_off():
    assert build("cl", backprop_rescaling=False).student.trunk_grad_scale == 1.0
    assert build("cl", peers=4).student.trunk_grad_scale == 0.25


def test_scale_grad_is_identity_forward():
    x = torch.randn(3, 4, requires_grad=True)
    y = losses.scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.full_like(x, 0.25))


def test_one_gate_learns_from_the_ensemble_cross_entropy_only():
    """The gate (on the trunk output) shapes z_e = sum_i g_i z_i; z_e is the branches' detached
    KD target, so the gate is trained by CE(z_e, y) alone (SPEC section 4)."""
    method = build("one")
    views, labels = batch(method, 3)
    out = method.student(views)
    terms = losses.one_loss(out.logits, out.ensemble, labels, kd_weight=1.0)
    gate = list(method.student.gate.parameters())
    kd = torch.autograd.grad(terms["kd_peers"], gate, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in kd)
    ce = torch.autograd.grad(terms["ce_ensemble"], gate, allow_unused=True)
    assert ce[0] is not None and ce[0].abs().sum() > 0  # the Linear reading the pooled trunk


def test_distillation_helpers_stay_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 64, 100, generator=gen) * 3
    q, k = torch.randn(3, 64, 8, generator=gen), torch.randn(3, 64, 8, generator=gen)
    gate = torch.rand(64, 3, generator=gen).softmax(1)
    exact = [losses.mutual_kd(z), losses.attention_targets(z, losses.attention_weights(q, k)),
             losses.gated_ensemble(z, gate)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = [losses.mutual_kd(z), losses.attention_targets(z, losses.attention_weights(q, k)),
                 losses.gated_ensemble(z, gate)]
    for a, b in zip(exact, mixed):
        assert b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", BASELINES)
def test_training_step_under_bf16_autocast(method):
    m = build(method)
    views, labels = batch(m, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.losses(views, labels, 10)
    loss = out.losses["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


# ----------------------------------------------------------------------------- parameter counts
def count(module):
    return sum(p.numel() for p in module.parameters())


def test_one_gate_parameter_count_resnet32():
    student = build("one", model="resnet32").student
    c_trunk = student.net.trunk_channels
    assert c_trunk == 32
    assert count(student.gate) == 3 * c_trunk + 3 + 6  # Linear weight + bias, BatchNorm weight + bias


def test_okddip_attention_parameter_count_and_layout_resnet32():
    method = build("okddip", model="resnet32")
    student = method.student
    d = student.net.feature_dim
    assert d == 64
    assert count(student.query) + count(student.key) == 2 * d * (d // 8)
    # default: 3 auxiliary peers + 1 extra leader tail; the deployed leader is the single network
    assert student.net.peers == 4
    assert count(method.deploy()) == count(models.create("resnet32", 10)) == 466_906
    assert count(student) == 112_592 + 4 * 354_314 + 2 * d * (d // 8)
    inside = build("okddip", model="resnet32", leader_in_peers=True)
    assert inside.student.net.peers == 3 and inside.auxiliary == 2


def test_cl_and_one_have_no_ensemble_head_and_deploy_the_baseline_network():
    for name in ("cl", "one"):
        method = build(name, model="resnet32")
        net = method.student.net if name == "one" else method.student
        assert net.head is None
        assert count(method.deploy()) == 466_906


# ----------------------------------------------------------------------------- configuration
def test_config_checks():
    for method, options in [("dml", {"temperature": 0}), ("cl", {"rampup_length": 0}),
                            ("one", {"rampup_max": -1}), ("kdcl", {"ensemble": "mean"}),
                            ("okddip", {"attention_factor": 0}), ("okddip", {"attention_factor": 100})]:
        with pytest.raises(ConfigError, match=next(iter(options))):
            build(method, **options)
    with pytest.raises(ConfigError, match="unknown config key"):
        build("dml", ensemble="minlogit")  # each method has its own namespace


def test_okddip_needs_two_auxiliary_peers():
    build("okddip", peers=2)  # 2 auxiliary peers + leader
    build("okddip", peers=3, leader_in_peers=True)
    with pytest.raises(ConfigError, match="auxiliary"):
        build("okddip", peers=2, leader_in_peers=True)


def test_ramp_follows_the_time_scale():
    method = build("one")
    assert method.time_constants() == {"time_scale": 1.0, "weights_at": "epoch start", "rampup_epochs": 80.0}
    assert method.kd_weight(0) == pytest.approx(math.exp(-5))
    assert method.kd_weight(80) == 1.0
    cfg = resolve([("test", {"method": "cl"})], method_configs())
    short = METHODS.get("cl")(cfg, Setup("resnet8", 10, 3, 3, 30, 10, TimeScale(0.1)))
    assert short.rampup_length == pytest.approx(8.0)
    assert short.kd_weight(4) == pytest.approx(math.exp(-5 * 0.25))


def test_methods_are_listed():
    for name in BASELINES:
        entry = METHODS.get(name)
        assert entry.summary and entry.paper and "\n" not in entry.summary


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", BASELINES)
def test_trains_one_epoch_through_the_engine(method, tmp_path):
    from dkel.engine import train

    cfg = resolve([("test", {"method": method, "model": "resnet8", "dataset": "digits", "epochs": 1,
                             "batch_size": 256, "out": str(tmp_path), "progress": "none", "device": "cpu"})],
                  method_configs())
    result = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["deploy_acc"] == result["deploy_acc"] == saved["metrics"][saved["deploy_output"]]
    assert saved["deploy_output"] == METHODS.get(method).deploy_metric
    assert set(saved["metrics"]) >= {"peer1", "peer2", "peer3", "peer_mean", "peer_max"}
    # the exported network is the one reported: its test accuracy, recomputed from the checkpoint
    from dkel.data import eval_batches, load_dataset
    from dkel.engine import restore

    _, trained, _, _ = restore(tmp_path, device="cpu")
    net = trained.deploy().eval()
    data = load_dataset("digits")
    with torch.no_grad():
        hits = sum((net(x).argmax(-1) == y).sum().item()
                   for x, y in eval_batches(data.test_images, data.test_labels, batch_size=500, mean=data.mean,
                                            std=data.std))
    assert hits / len(data.test_labels) == saved["metrics"]["leader" if method == "okddip" else "peer1"]


def input_size(model):
    return models.MODELS.get(model).input_size


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("model", models.MODELS.names())
def test_every_model_takes_a_training_step(method, model):
    k = 2
    m = build(method, model=model, peers=k)
    views, labels = batch(m, k, size=input_size(model), b=2)
    out = m.losses(views, labels, 0)
    loss = out.losses["loss"]
    assert torch.isfinite(loss)
    assert out.logits.shape == (2, 10)
    loss.backward()
    assert all(p.grad is not None for p in m.student.parameters())


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("k", [2, 4])
def test_eval_outputs_and_deploy(method, k):
    m = build(method, peers=k).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outs = m.eval_logits(x)
        deployed = m.deploy().eval()(x)
    aux = k
    assert [f"peer{i + 1}" for i in range(aux)] == m.peer_groups()["peer"]
    assert all(o.shape == (3, 10) for o in outs.values())
    assert set(m.peer_groups()["peer"]) <= set(outs)
    deployed_name = "leader" if method == "okddip" else "peer1"
    assert m.deploy_metric == ("leader" if method == "okddip" else "peer_mean")  # SPEC section 6
    assert torch.allclose(deployed, outs[deployed_name], atol=1e-5)
    assert isinstance(m.deploy(), models.SingleNet)


# ----------------------------------------------------------------------------- config files
TABLE = {"cifar10": ["resnet32", "resnet110", "vgg16", "densenet40_12", "wrn20_8"],
         "cifar100": ["resnet32", "resnet110", "vgg16", "densenet40_12", "wrn20_8"],
         "tinyimagenet": ["resnet18", "resnet34"]}


@pytest.mark.parametrize("method", BASELINES)
def test_table_one_configs(method):
    for dataset, model_names in TABLE.items():
        for model in model_names:
            path = REPO / "configs" / dataset / f"{method}_{model}.yaml"
            values = load_yaml(path)
            cfg = resolve([(str(path), values)], method_configs())
            METHODS.get(method).check(cfg)
            assert (cfg.method, cfg.model, cfg.dataset) == (method, model, dataset)
            assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (128, 0.1, 0.9, True, 5e-4)
            assert cfg.schedule == "multistep"
            full = (300, [150, 225]) if dataset.startswith("cifar") else (100, [30, 60])
            assert (cfg.epochs, list(cfg.milestones)) == full


@pytest.mark.parametrize("method", ["independent", "dml", "one", "okddip", "kdcl", "pcl", "dkel"])
def test_imagenet_configs(method):
    path = REPO / "configs" / "imagenet" / f"{method}_resnet18.yaml"
    cfg = resolve([(str(path), load_yaml(path))], method_configs())
    METHODS.get(method).check(cfg)
    assert (cfg.method, cfg.model, cfg.dataset) == (method, "resnet18_imagenet", "imagenet")
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (256, 0.1, 0.9, True, 1e-4)
    assert (cfg.schedule, cfg.epochs, list(cfg.milestones)) == ("multistep", 90, [30, 60])


# ----------------------------------------------------------------------------- switches to the authors' code
@pytest.mark.parametrize("method", ["cl", "one", "okddip"])
def test_shared_view_is_per_peer_training_on_copies_of_one_view(method):
    """views=shared: the loader makes one view and every tail trains on it, which is the per-peer
    method fed K identical views (the authors' code feeds one image to every branch)."""
    shared, per_peer = build(method, views="shared"), build(method)
    assert shared.view_count(shared.cfg) == 1 and per_peer.view_count(per_peer.cfg) == 3
    per_peer.load_state_dict(shared.state_dict())
    one, labels = batch(shared, 3)
    assert one.shape[0] == 1
    a = shared.losses(one, labels, 100).losses
    b = per_peer.losses(one.expand(3, -1, -1, -1, -1), labels, 100).losses
    for name in a:
        assert float(torch.as_tensor(a[name]).detach()) == pytest.approx(float(torch.as_tensor(b[name]).detach()),
                                                                         rel=1e-5), name
    other = per_peer.losses(batch(per_peer, 3)[0], labels, 100).losses  # K different views: another loss
    assert other["loss"].item() != pytest.approx(a["loss"].item(), rel=1e-3)


def test_shared_view_reaches_the_loader():
    from dkel import runtime
    from dkel.engine import build as build_run

    rt = runtime.setup("cpu", "fp32", False)
    built = build_run(resolve([("test", {"method": "one", "views": "shared", "train_subset": 100,
                                         "progress": "none"})], method_configs()), rt)
    views, _ = next(built.data.train_batches(0))
    assert views.shape[0] == 1


def test_okddip_leader_target_undetached_trains_the_peers():
    z, y = logits_for(3)
    zt, leader = t(z, grad=True), t(z[0], grad=True)
    out = losses.okddip_loss(zt, leader, zt, torch.tensor(y), kd_weight=1.0, detach_leader_target=False)
    (grad,) = torch.autograd.grad(out["kd_leader"], zt)
    # with q = softmax(m / tau), m = mean_a z_a, and d = log q - log softmax(z_L / tau):
    # d KD_tau(z_L, m) / d z_a = (tau / B) q (d - sum_c q_c d_c) / K
    q = soft(zt.mean(0))
    d = q.log() - soft(leader).log()
    expected = TAU / z.shape[1] * q * (d - (q * d).sum(-1, keepdim=True)) / 3
    assert torch.allclose(grad, expected.expand_as(grad), rtol=1e-10, atol=1e-12)
    assert build("okddip", detach_leader_target=False).hp.detach_leader_target is False


@pytest.mark.parametrize("k", [2, 3])
def test_cl_song_chai_loss_value(k):
    z, y = logits_for(k)
    expected = 0.0
    for h in range(k):
        others = sum(z[j] for j in range(k) if j != h) / (k - 1)
        expected += 0.3 * ce_ref(z[h], y) + 0.7 * kd_ref(z[h], others, tau=2.0)
    got = losses.cl_song_chai_loss(t(z), torch.tensor(y), hard_weight=0.3, temperature=2.0)
    assert close(got["loss"], expected)


def test_cl_song_chai_switch_sets_their_beta_and_tau():
    method = build("cl", loss="song_chai")
    assert (method.hp.hard_weight, method.hp.temperature) == (0.5, 2.0)
    assert build("cl").hp.temperature == 3.0 and build("cl", loss="song_chai", temperature=4).hp.temperature == 4
    assert method.time_constants() == {}  # no ramp-up in their loss
    views, labels = batch(method, 3)
    logits = method.student(views).logits
    expected = losses.cl_song_chai_loss(logits, labels, hard_weight=0.5, temperature=2.0)["loss"]
    got = method.losses(views, labels, 0).losses
    assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-5) and "w_rampup" not in got
    with pytest.raises(ConfigError, match="loss must be one of"):
        build("cl", loss="songchai")


def test_kdcl_lowest_ce_member_worked_example():
    # peer 1 is surer of the true class in sample 0, peer 2 in sample 1
    z = np.array([[[3.0, 0.0, 0.0], [2.0, 0.0, 1.0]],
                  [[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    y = np.array([0, 2])
    got = losses.lowest_ce_member(t(z), torch.tensor(y))
    assert np.array_equal(got.numpy(), np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    loss = losses.kdcl_loss(t(z), torch.tensor(y), ensemble="lowest_ce")
    expected = sum(ce_ref(z[i], y) + kd_ref(z[i], got.numpy()) for i in range(2))
    assert close(loss["loss"], expected)
