"""Pure loss and weight-schedule functions (no state), usable in any training loop.

Conventions: logits of K peers come as one [K, B, C] tensor or a sequence of K [B, C]
tensors; distillation targets are detached and every KL is computed in float32."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Logits = Union[Tensor, Sequence[Tensor]]
DECAYS = ("exp", "cos", "linear", "none", "const")
MODES = ("paper", "reference")
REFERENCE_LAMBDA = 0.1  # the released code calls its ramp with lambd=0.1 ...
REFERENCE_CUTOFF = 0.01  # ... and zeroes the ensemble weight once it is <= 0.01
# label smoothing is part of the recipe, not of a method: the engine sets it around training, and
# every cross-entropy against the labels (whichever method computes it) uses it
_LABEL_SMOOTHING = contextvars.ContextVar("label_smoothing", default=0.0)


@contextlib.contextmanager
def label_smoothing(epsilon: float) -> Iterator[None]:
    """Within the block, `cross_entropy` smooths the labels by `epsilon`."""
    token = _LABEL_SMOOTHING.set(float(epsilon))
    try:
        yield
    finally:
        _LABEL_SMOOTHING.reset(token)


def stack(logits: Logits) -> Tensor:
    return logits if isinstance(logits, Tensor) else torch.stack(list(logits))


def full(x: Tensor) -> Tensor:
    """At least float32: half-precision logits from autocast are promoted, float64 kept (and no
    operator is called for what already is: a no-op .to() still costs a dispatch per call)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- weights
Weight = Union[float, Tensor]  # a schedule's value: a float, or a 0-d tensor when progress is one


def _exp(x: Weight) -> Weight:
    return torch.exp(x) if isinstance(x, Tensor) else math.exp(x)


def sigmoid_rampup(epoch: Weight, length: float = 80.0, maximum: float = 1.0) -> Weight:
    """Mean-teacher ramp r(e) = max * exp(-5 (1 - e/length)^2) for e < length, max after.

    Every schedule here also takes the epoch as a 0-d tensor (the compiled training step passes
    it so), and then gives a tensor, computed without branching on its value."""
    if isinstance(epoch, Tensor):
        return maximum * torch.exp(-5.0 * (1.0 - (epoch / length).clamp(max=1.0)) ** 2)
    if epoch >= length:
        return maximum
    return maximum * _exp(-5.0 * (1.0 - epoch / length) ** 2)


def reference_rampup(epoch: float, cutoff: float = 80.0, lam: float = REFERENCE_LAMBDA) -> float:
    """The released code's ramp: it divides by lambda where the ramp length belongs,
    so r = 6.7e-4 at e=0, ~1e-177 at e=1, 0 until the cutoff, then lambda."""
    if isinstance(epoch, Tensor):
        return torch.where(epoch > cutoff, lam, lam * torch.exp(-5.0 * (1.0 - epoch / lam) ** 2))
    if epoch > cutoff:
        return lam
    return lam * _exp(-5.0 * (1.0 - epoch / lam) ** 2)


def decay_weight(epoch: float, kind: str = "exp", beta: float = 0.5, horizon: float = 10.0) -> float:
    """Weight w(e) of the decaying teacher ensemble."""
    if kind == "exp":
        return _exp(-beta * epoch)
    if kind == "cos":
        if isinstance(epoch, Tensor):
            return 0.5 * (1.0 + torch.cos(math.pi * epoch.clamp(max=horizon) / horizon))
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, horizon) / horizon))
    if kind == "linear":
        if isinstance(epoch, Tensor):
            return (1.0 - epoch / horizon).clamp(min=0.0)
        return max(0.0, 1.0 - epoch / horizon)
    if kind == "none":
        return 0.0
    if kind == "const":
        return 1.0
    raise ValueError(f"unknown decay {kind!r}; valid: {', '.join(DECAYS)}")


# ----------------------------------------------------------------------------- losses
def cross_entropy(logits: Logits, targets: Tensor) -> Tensor:
    """Cross-entropy summed over peers ([K, B, C]) or of one head ([B, C]), batch-mean."""
    z = stack(logits)
    smoothing = _LABEL_SMOOTHING.get()
    if z.dim() == 2:
        return F.cross_entropy(full(z), targets, label_smoothing=smoothing)
    k = z.shape[0]
    return F.cross_entropy(full(z.flatten(0, 1)), targets.repeat(k), label_smoothing=smoothing) * k


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0,
            detach_target: bool = True) -> Tensor:
    """tau^2 * KL(softmax(t/tau) || softmax(s/tau)), summed over classes, mean over the batch.

    [B, C] inputs give a scalar; leading dims ([K, B, C]) are kept, one value per peer."""
    t = teacher_logits.detach() if detach_target else teacher_logits
    log_q = F.log_softmax(full(t) / temperature, dim=-1)
    log_p = F.log_softmax(full(student_logits) / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return temperature ** 2 * kl.mean(-1)


def pairwise_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """[K, K] matrix: entry (i, j) = kd_loss(student_i, teacher_j); teachers detached.

    One log-softmax per tensor and one broadcast product instead of K^2 separate losses
    (elementwise, so autocast cannot lower it to bf16 as it would a matmul)."""
    log_q = F.log_softmax(full(teacher_logits.detach()) / temperature, dim=-1)
    log_p = F.log_softmax(full(student_logits) / temperature, dim=-1)
    q = log_q.exp()
    neg_entropy = (q * log_q).sum(-1).mean(-1)  # [K] teachers
    cross = (q[None] * log_p[:, None]).sum(-1).mean(-1)  # [K students, K teachers]
    return temperature ** 2 * (neg_entropy[None, :] - cross)


def others_mean(logits: Tensor) -> Tensor:
    """For each peer i, the mean of the other peers' logits: [K, B, C] -> [K, B, C]."""
    k = logits.shape[0]
    return (logits.sum(0, keepdim=True) - logits) / (k - 1)


def off_diagonal_mean(matrix: Tensor) -> Tensor:
    """Row means of a [K, K] matrix without its diagonal."""
    k = matrix.shape[0]
    return (matrix.sum(1) - matrix.diagonal()) / (k - 1)


def dkel_weights(epoch: float, *, mode: str = "paper", beta: float = 0.5, decay: str = "exp",
                 decay_horizon: float = 10.0, rampup_length: float = 80.0, rampup_max: float = 1.0,
                 dk_weight: float = 1.0, dk_rampup: bool = False) -> dict[str, float]:
    """The three weights of DKEL at an epoch: ramp r, ensemble decay w, DK weight lambda_dk."""
    if mode == "reference":
        r = reference_rampup(epoch, cutoff=rampup_length)
        w = _exp(-beta * epoch)
        cut = torch.where(w > REFERENCE_CUTOFF, w, 0.0) if isinstance(w, Tensor) else w if w > REFERENCE_CUTOFF else 0.0
        return {"rampup": r, "decay": cut, "dk": r}
    if mode != "paper":
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    r = sigmoid_rampup(epoch, rampup_length, rampup_max)
    dk = dk_weight * (sigmoid_rampup(epoch, rampup_length) if dk_rampup else 1.0)
    return {"rampup": r, "decay": decay_weight(epoch, decay, beta, decay_horizon), "dk": dk}


def dkel_loss(student_logits: Logits, ensemble_logits: Tensor, teacher_logits: Logits, targets: Tensor,
              epoch: float, *, mode: str = "paper", temperature: float = 3.0, beta: float = 0.5,
              decay: str = "exp", decay_horizon: float = 10.0, rampup_length: float = 80.0,
              rampup_max: float = 1.0, dk_weight: float = 1.0, dk_rampup: bool = False) -> dict[str, Tensor | float]:
    """DKEL's loss (SPEC section 2), summed over the K student peers:

        L = CE(z_E, y) + sum_i [ CE(z_i, y) + r KD(z_i, z_E)
                                 + lambda_dk ( w KD(z_i, mean_{j!=i} t_j)
                                               + (1 - w) mean_{j!=i} KD(z_i, t_j) ) ]

    mode="reference" takes r, w and lambda_dk from the released code instead (SPEC 2.1);
    decay, rampup_max, dk_weight and dk_rampup are then ignored.  Returns the total under
    "loss", each unweighted term (summed over peers) and each weight (as floats)."""
    z, t = stack(student_logits), stack(teacher_logits).detach()
    k = z.shape[0]
    if k < 2 or t.shape[0] != k:
        raise ValueError(f"DKEL needs K >= 2 student peers and as many teacher peers; got {k} and {t.shape[0]}")
    wts = dkel_weights(epoch, mode=mode, beta=beta, decay=decay, decay_horizon=decay_horizon,
                       rampup_length=rampup_length, rampup_max=rampup_max, dk_weight=dk_weight,
                       dk_rampup=dk_rampup)
    r, w, dk = wts["rampup"], wts["decay"], wts["dk"]
    terms = {
        "ce_ensemble": cross_entropy(ensemble_logits, targets),
        "ce_peers": cross_entropy(z, targets),
        "kd_ensemble": kd_loss(z, ensemble_logits.expand_as(z), temperature).sum(),
        "dk_individual": off_diagonal_mean(pairwise_kd(z, t, temperature)).sum(),
    }
    # a zero weight skips the term, as the released code does (a weight given as a tensor keeps it:
    # deciding would need its value on the host)
    skip = not isinstance(w, Tensor) and w <= 0
    terms["dk_ensemble"] = z.new_zeros(()) if skip else kd_loss(z, others_mean(t), temperature).sum()
    loss = sum(dkel_summands(terms, wts).values())
    return {"loss": loss, **terms, **{f"w_{name}": value for name, value in wts.items()}}


def dkel_summands(terms: dict[str, Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    """DKEL's loss as a sum: each unweighted term of `dkel_loss` times its weight."""
    r, w, dk = weights["rampup"], weights["decay"], weights["dk"]
    return {"ce_ensemble": terms["ce_ensemble"], "ce_peers": terms["ce_peers"], "kd_ensemble": r * terms["kd_ensemble"],
            "dk_ensemble": dk * w * terms["dk_ensemble"], "dk_individual": dk * (1 - w) * terms["dk_individual"]}


def gradient_shares(parts: dict[str, Tensor], wrt: Tensor) -> dict[str, float]:
    """Each summand's share of the gradient at `wrt`: ||d part / d wrt|| over the sum of these norms
    (a part that does not depend on `wrt`, e.g. a skipped term, has share 0)."""
    norms = {name: torch.autograd.grad(part, wrt, retain_graph=True)[0].norm().item() if part.requires_grad else 0.0
             for name, part in parts.items()}
    total = sum(norms.values()) or 1.0
    return {name: value / total for name, value in norms.items()}


# ----------------------------------------------------------------------------- baselines (SPEC section 4)
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient flowing back through it by `factor`
    (CL's backprop rescaling: factor 1/K where K tails share one trunk)."""
    return _ScaleGrad.apply(x, factor) if factor != 1.0 and torch.is_grad_enabled() else x


def peer_kd(student_logits: Tensor, targets: Tensor, temperature: float = 3.0, detach_target: bool = True) -> Tensor:
    """sum_i KD_tau(z_i, t_i) over the leading peer axis of [K, B, C] logits and targets."""
    return kd_loss(student_logits, targets, temperature, detach_target).sum()


def mutual_kd(logits: Tensor, temperature: float = 3.0) -> Tensor:
    """DML's distillation, summed over peers: sum_k mean_{l != k} KD_tau(z_k, z_l), peers detached."""
    return off_diagonal_mean(pairwise_kd(logits, logits, temperature)).sum()


def dml_loss(logits: Logits, targets: Tensor, *, temperature: float = 3.0,
             tau_squared: bool = True) -> dict[str, Tensor]:
    """DML (Zhang et al. 2018): sum_k [ CE(z_k, y) + (1/(K-1)) sum_{l != k} KD_tau(z_k, z_l) ].

    tau_squared=False drops the tau^2 factor of KD (the DML paper: tau = 1, plain KL)."""
    z = stack(logits)
    _need_peers(z, 2, "DML")
    kd = mutual_kd(z, temperature)
    if not tau_squared:
        kd = kd / temperature ** 2
    ce = cross_entropy(z, targets)
    return {"loss": ce + kd, "ce_peers": ce, "kd_peers": kd}


def cl_loss(logits: Logits, targets: Tensor, *, kd_weight: float, temperature: float = 3.0) -> dict[str, Tensor]:
    """CL-ILR (Song & Chai 2018): sum_h [ CE(z_h, y) + r KD_tau(z_h, mean_{j != h} z_j) ], targets detached.

    The backprop rescaling of the shared trunk is a property of the forward pass (`scale_grad`)."""
    z = stack(logits)
    _need_peers(z, 2, "CL")
    ce = cross_entropy(z, targets)
    kd = peer_kd(z, others_mean(z), temperature)
    return {"loss": ce + kd_weight * kd, "ce_peers": ce, "kd_peers": kd}


def cl_song_chai_loss(logits: Logits, targets: Tensor, *, hard_weight: float = 0.5,
                      temperature: float = 2.0) -> dict[str, Tensor]:
    """CL as Song & Chai write it: sum_h [ beta CE(z_h, y) + (1 - beta) KD_tau(z_h, mean_{j != h} z_j) ],
    beta = hard_weight, targets detached, no ramp-up (KD_tau includes tau^2)."""
    z = stack(logits)
    _need_peers(z, 2, "CL")
    ce = cross_entropy(z, targets)
    kd = peer_kd(z, others_mean(z), temperature)
    return {"loss": hard_weight * ce + (1 - hard_weight) * kd, "ce_peers": ce, "kd_peers": kd}


def gated_ensemble(logits: Tensor, gate: Tensor) -> Tensor:
    """ONE's ensemble z_e[b] = sum_i g[b, i] z_i[b]: logits [K, B, C], gate [B, K] -> [B, C]."""
    return (logits * gate.t().unsqueeze(-1).to(logits.dtype)).sum(0)


def one_loss(logits: Logits, ensemble_logits: Tensor, targets: Tensor, *, kd_weight: float,
             temperature: float = 3.0) -> dict[str, Tensor]:
    """ONE (Lan et al. 2018): sum_i CE(z_i, y) + CE(z_e, y) + r sum_i KD_tau(z_i, z_e), z_e detached."""
    z = stack(logits)
    ce = cross_entropy(z, targets)
    ce_e = cross_entropy(ensemble_logits, targets)
    kd = peer_kd(z, ensemble_logits.expand_as(z), temperature)
    return {"loss": ce + ce_e + kd_weight * kd, "ce_peers": ce, "ce_ensemble": ce_e, "kd_peers": kd}


def attention_weights(queries: Tensor, keys: Tensor) -> Tensor:
    """OKDDip's alpha[b, a, c] = softmax_c(q_a[b] . k_c[b]) over the K peers: q, k [K, B, d'] -> [B, K, K].

    Elementwise products (not einsum/bmm), so autocast leaves them in float32."""
    energy = (full(queries)[:, None] * full(keys)[None]).sum(-1)  # [K a, K c, B]
    return energy.permute(2, 0, 1).softmax(dim=-1)


def attention_targets(logits: Tensor, alpha: Tensor) -> Tensor:
    """t_a[b] = sum_c alpha[b, a, c] z_c[b]: logits [K, B, C], alpha [B, K, K] -> [K, B, C].

    Not detached: the distillation gradient through t trains the attention (W_q, W_k)."""
    weights = alpha.permute(1, 2, 0).unsqueeze(-1)  # [K a, K c, B, 1]
    return (weights * full(logits)[None]).sum(1)


def okddip_loss(peer_logits: Logits, leader_logits: Tensor, attention_logits: Tensor, targets: Tensor, *,
                kd_weight: float, temperature: float = 3.0, detach_leader_target: bool = True) -> dict[str, Tensor]:
    """OKDDip (Chen et al. 2020), auxiliary peers a and leader L:

        L = sum_a CE(z_a, y) + CE(z_L, y) + r [ sum_a KD_tau(z_a, t_a) + KD_tau(z_L, mean_a z_a) ]

    The attention targets t_a ([K, B, C]) keep their gradient; the leader's target is detached
    unless detach_leader_target=False (the official train_GL.py: it also trains the peers)."""
    z = stack(peer_logits)
    ce = cross_entropy(z, targets)
    ce_leader = cross_entropy(leader_logits, targets)
    kd = peer_kd(z, attention_logits, temperature, detach_target=False)
    kd_leader = kd_loss(leader_logits, z.mean(0), temperature, detach_target=detach_leader_target)
    return {"loss": ce + ce_leader + kd_weight * (kd + kd_leader), "ce_peers": ce, "ce_leader": ce_leader,
            "kd_peers": kd, "kd_leader": kd_leader}


def minlogit_ensemble(logits: Logits, targets: Tensor) -> Tensor:
    """KDCL's MinLogit teacher: subtract each peer's true-class logit, then the elementwise minimum
    over peers: z_t[b, c] = min_i (z_i[b, c] - z_i[b, y_b]).  [K, B, C] -> [B, C]."""
    z = stack(logits)
    index = targets.view(1, -1, 1).expand(z.shape[0], -1, 1)
    return (z - z.gather(-1, index)).amin(0)


def lowest_ce_member(logits: Logits, targets: Tensor) -> Tensor:
    """KDCL's own naive ensemble: for every image, the logits of the peer with the lowest
    cross-entropy on it.  [K, B, C] -> [B, C]."""
    z = stack(logits)
    true_class = F.log_softmax(full(z), dim=-1).gather(-1, targets.view(1, -1, 1).expand(z.shape[0], -1, 1))
    best = true_class.argmax(0, keepdim=True).expand(1, -1, z.shape[-1])  # highest log-prob = lowest CE
    return z.gather(0, best)[0]


ENSEMBLES = ("minlogit", "naive", "lowest_ce")


def kdcl_loss(logits: Logits, targets: Tensor, *, ensemble: str = "minlogit",
              temperature: float = 3.0) -> dict[str, Tensor]:
    """KDCL (Guo et al. 2020): sum_i [ CE(z_i, y) + KD_tau(z_i, z_t) ], z_t built from all peers, detached.

    ensemble="minlogit": `minlogit_ensemble`; "naive": the mean of the peers' logits (SPEC);
    "lowest_ce": `lowest_ce_member` (what KDCL itself calls naive)."""
    z = stack(logits)
    if ensemble == "minlogit":
        teacher = minlogit_ensemble(z.detach(), targets)
    elif ensemble == "naive":
        teacher = z.detach().mean(0)
    elif ensemble == "lowest_ce":
        teacher = lowest_ce_member(z.detach(), targets)
    else:
        raise ValueError(f"unknown ensemble {ensemble!r}; valid: {', '.join(ENSEMBLES)}")
    ce = cross_entropy(z, targets)
    kd = peer_kd(z, teacher.expand_as(z), temperature)
    return {"loss": ce + kd, "ce_peers": ce, "kd_peers": kd}


def _need_peers(z: Tensor, k: int, method: str) -> None:
    if z.dim() != 3 or z.shape[0] < k:
        raise ValueError(f"{method} needs logits [K, B, C] with K >= {k}, got shape {tuple(z.shape)}")
