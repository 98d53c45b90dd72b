"""Golden-value tests of dkel.losses against independent per-peer loops in float64."""
import math

import numpy as np
import pytest
import torch

from dkel import losses as L

T = 3.0


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kd(student, teacher, tau=T):
    """tau^2 * batch-mean KL(softmax(t/tau) || softmax(s/tau)), by hand."""
    p_t, p_s = softmax(teacher / tau), softmax(student / tau)
    return tau ** 2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1))


def ce(logits, y):
    p = softmax(logits)
    return -np.mean(np.log(p[np.arange(len(y)), y]))


def logits(k, b=5, c=4, seed=0, scale=2.0):
    g = np.random.default_rng(seed)
    return g.normal(size=(k, b, c)) * scale


@pytest.fixture
def batch():
    g = np.random.default_rng(1)
    return {k: (logits(k, seed=k), g.normal(size=(5, 4)) * 2, logits(k, seed=10 + k),
                np.array([0, 3, 1, 2, 3])) for k in (2, 3, 4)}


def test_kd_loss_golden_value():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    assert L.kd_loss(s, t).item() == pytest.approx(kd(s.numpy(), t.numpy()), rel=1e-6)
    assert L.kd_loss(s, t).item() == pytest.approx(1.16595, abs=1e-4)  # by hand: 9 * (0.0904 + 0.1686) / 2
    assert L.kd_loss(s, s).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_detaches_target_and_promotes_half_precision():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    L.kd_loss(s.bfloat16(), t.bfloat16()).backward()
    assert t.grad is None and s.grad is not None
    assert L.kd_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_pairwise_kd_matches_every_pair():
    z, t = torch.tensor(logits(3)), torch.tensor(logits(3, seed=5))
    m = L.pairwise_kd(z, t).numpy()
    for i in range(3):
        for j in range(3):
            assert m[i, j] == pytest.approx(kd(z[i].numpy(), t[j].numpy()), rel=1e-10)


def test_pairwise_kd_stays_float32_under_autocast():
    z, t = torch.randn(3, 64, 100) * 4, torch.randn(3, 64, 100) * 4
    exact = L.pairwise_kd(z.double(), t.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.pairwise_kd(z, t)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_ramp_and_decays_by_hand():
    assert L.sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert L.sigmoid_rampup(40, 80, 2.0) == pytest.approx(2 * math.exp(-1.25))
    assert L.sigmoid_rampup(80, 80) == 1.0 and L.sigmoid_rampup(200, 80, 0.5) == 0.5
    assert L.decay_weight(4, "exp", 0.5) == pytest.approx(math.exp(-2))
    assert L.decay_weight(5, "cos", horizon=10) == pytest.approx(0.5)
    assert L.decay_weight(12, "cos", horizon=10) == 0.0
    assert L.decay_weight(2.5, "linear", horizon=10) == pytest.approx(0.75)
    assert L.decay_weight(30, "linear", horizon=10) == 0.0
    assert L.decay_weight(7, "none") == 0.0 and L.decay_weight(7, "const") == 1.0


def test_reference_weights_by_hand():
    """SPEC 2.1: r = 6.7e-4 at e=0, ~1e-177 at e=1, 0 for 2..80, 0.1 from 81; w cut at 0.01."""
    w = {e: L.dkel_weights(e, mode="reference") for e in (0, 1, 2, 9, 10, 80, 81, 299)}
    assert w[0]["rampup"] == pytest.approx(6.737947e-4, rel=1e-6)
    assert 1e-178 < w[1]["rampup"] < 1e-176
    assert w[2]["rampup"] == w[9]["rampup"] == w[80]["rampup"] == 0.0
    assert w[81]["rampup"] == w[299]["rampup"] == 0.1
    assert w[9]["decay"] == pytest.approx(math.exp(-4.5)) and w[10]["decay"] == 0.0
    assert all(v["dk"] == v["rampup"] for v in w.values())


def expected_dkel(z, z_e, t, y, r, w, dk):
    """SPEC section 2 loss with explicit loops over peers."""
    k = len(z)
    total = ce(z_e, y)
    terms = {"ce_ensemble": ce(z_e, y), "ce_peers": 0.0, "kd_ensemble": 0.0, "dk_ensemble": 0.0,
             "dk_individual": 0.0}
    for i in range(k):
        others = [j for j in range(k) if j != i]
        ens = kd(z[i], np.mean([t[j] for j in others], 0))
        ind = np.mean([kd(z[i], t[j]) for j in others])
        terms["ce_peers"] += ce(z[i], y)
        terms["kd_ensemble"] += kd(z[i], z_e)
        terms["dk_ensemble"] += ens
        terms["dk_individual"] += ind
        total += ce(z[i], y) + r * kd(z[i], z_e) + dk * (w * ens + (1 - w) * ind)
    return total, terms


def run(z, z_e, t, y, epoch, **kw):
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)
    return L.dkel_loss(as_t(z), as_t(z_e), as_t(t), torch.tensor(y), epoch, **kw)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("decay", L.DECAYS)
@pytest.mark.parametrize("epoch", [0, 3, 12, 100])
def test_paper_mode_every_term_every_decay(batch, k, decay, epoch):
    z, z_e, t, y = batch[k]
    got = run(z, z_e, t, y, epoch, decay=decay, beta=0.3, decay_horizon=8, rampup_length=20, rampup_max=0.7)
    r = 0.7 * (math.exp(-5 * (1 - epoch / 20) ** 2) if epoch < 20 else 1.0)
    w = {"exp": math.exp(-0.3 * epoch), "cos": 0.5 * (1 + math.cos(math.pi * min(epoch, 8) / 8)),
         "linear": max(0.0, 1 - epoch / 8), "none": 0.0, "const": 1.0}[decay]
    total, terms = expected_dkel(z, z_e, t, y, r, w, 1.0)
    assert got["loss"].item() == pytest.approx(total, rel=1e-10)
    for name, value in terms.items():
        if not (name == "dk_ensemble" and w == 0):  # a zero-weight term is skipped
            assert got[name].item() == pytest.approx(value, rel=1e-10), name
    assert (got["w_rampup"], got["w_dk"]) == (pytest.approx(r), 1.0)
    assert got["w_decay"] == pytest.approx(w)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_paper_mode_dk_rampup_and_weight(batch, k):
    z, z_e, t, y = batch[k]
    got = run(z, z_e, t, y, 10, dk_rampup=True, dk_weight=2.0, rampup_length=40)
    ramp = math.exp(-5 * 0.75 ** 2)
    total, _ = expected_dkel(z, z_e, t, y, ramp, math.exp(-5), 2.0 * ramp)
    assert got["loss"].item() == pytest.approx(total, rel=1e-10)


def test_reference_mode_fixed_values(batch):
    """Totals at the epochs where the released code's weights change, with the weights by hand."""
    z, z_e, t, y = batch[3]
    _, terms = expected_dkel(z, z_e, t, y, 0, 0, 0)
    ce_only = terms["ce_ensemble"] + terms["ce_peers"]
    r0 = 0.1 * math.exp(-5)
    hand = {
        0: ce_only + r0 * terms["kd_ensemble"] + r0 * terms["dk_ensemble"],  # w = 1
        1: ce_only,  # r ~ 1e-177 leaves nothing visible in float64
        9: ce_only,
        10: ce_only,
        80: ce_only,
        81: ce_only + 0.1 * terms["kd_ensemble"] + 0.1 * terms["dk_individual"],  # w = 0
    }
    for epoch, value in hand.items():
        assert run(z, z_e, t, y, epoch, mode="reference")["loss"].item() == pytest.approx(value, rel=1e-12)
    assert hand[0] == pytest.approx(8.1012697, rel=1e-6) and hand[81] == pytest.approx(9.8120621, rel=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("epoch,r,w", [(0, 0.1 * math.exp(-5), 1.0), (5, 0.0, math.exp(-2.5)),
                                       (81, 0.1, 0.0), (150, 0.1, 0.0)])
def test_reference_mode_every_term_for_k_peers(batch, k, epoch, r, w):
    """The released code's weights (r doubles as lambda_dk) applied to the SPEC terms, K = 2..4."""
    z, z_e, t, y = batch[k]
    total, _ = expected_dkel(z, z_e, t, y, r, w, r)
    assert run(z, z_e, t, y, epoch, mode="reference")["loss"].item() == pytest.approx(total, rel=1e-10)


def test_sequence_and_stacked_inputs_agree(batch):
    z, z_e, t, y = batch[3]
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)
    a = L.dkel_loss(list(as_t(z)), as_t(z_e), list(as_t(t)), torch.tensor(y), 2)
    b = L.dkel_loss(as_t(z), as_t(z_e), as_t(t), torch.tensor(y), 2)
    assert a["loss"].item() == b["loss"].item()


def test_teacher_logits_get_no_gradient(batch):
    z, z_e, t = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in batch[3][:3])
    y = torch.tensor(batch[3][3])
    L.dkel_loss(z, z_e, t, y, 0)["loss"].backward()
    assert t.grad is None and z.grad is not None and z_e.grad is not None


def test_dkel_needs_two_peers():
    with pytest.raises(ValueError, match="K >= 2"):
        L.dkel_loss(torch.zeros(1, 2, 3), torch.zeros(2, 3), torch.zeros(1, 2, 3), torch.zeros(2).long(), 0)


def test_gradient_shares_against_closed_forms():
    """d CE/dz_i = (softmax(z_i) - onehot) / B and d KD_tau(z_i, t_i)/dz_i = tau / B (p_i - q_i) at tau."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 6, 5, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(3, 6, 5, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (6,), generator=g)
    parts = {"ce": L.cross_entropy(z, y), "kd": 0.5 * L.kd_loss(z, t).sum(), "off": z.new_zeros(())}
    shares = L.gradient_shares(parts, z)
    onehot = torch.nn.functional.one_hot(y, 5).double()
    ce_norm = ((z.detach().softmax(-1) - onehot) / 6).norm()
    kd_norm = (0.5 * T / 6 * ((z.detach() / T).softmax(-1) - (t / T).softmax(-1))).norm()
    assert shares["ce"] == pytest.approx(float(ce_norm / (ce_norm + kd_norm)), rel=1e-10)
    assert shares["kd"] == pytest.approx(float(kd_norm / (ce_norm + kd_norm)), rel=1e-10)
    assert shares["off"] == 0.0

