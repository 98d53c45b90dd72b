"""Pure loss and weight-schedule functions (no state), usable in any training loop.

Conventions: logits of K peers come as one [K, B, C] tensor or a sequence of K [B, C]
tensors; distillation targets are detached and every KL is computed in float32."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Logits = Union[Tensor, Sequence[Tensor]]
DECAYS = ("exp", "cos", "linear", "none", "const")
MODES = ("paper", "reference")
REFERENCE_LAMBDA = 0.1  # the released code calls its ramp with lambd=0.1 ...
REFERENCE_CUTOFF = 0.01  # ... and zeroes the ensemble weight once it is <= 0.01


def stack(logits: Logits) -> Tensor:
    return logits if isinstance(logits, Tensor) else torch.stack(list(logits))


def full(x: Tensor) -> Tensor:
    """At least float32: half-precision logits from autocast are promoted, float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- weights
def sigmoid_rampup(epoch: float, length: float = 80.0, maximum: float = 1.0) -> float:
    """Mean-teacher ramp r(e) = max * exp(-5 (1 - e/length)^2) for e < length, max after."""
    if epoch >= length:
        return maximum
    return maximum * math.exp(-5.0 * (1.0 - epoch / length) ** 2)


def reference_rampup(epoch: float, cutoff: float = 80.0, lam: float = REFERENCE_LAMBDA) -> float:
    """The released code's ramp: it divides by lambda where the ramp length belongs,
    so r = 6.7e-4 at e=0, ~1e-177 at e=1, 0 until the cutoff, then lambda."""
    if epoch > cutoff:
        return lam
    return lam * math.exp(-5.0 * (1.0 - epoch / lam) ** 2)


def decay_weight(epoch: float, kind: str = "exp", beta: float = 0.5, horizon: float = 10.0) -> float:
    """Weight w(e) of the decaying teacher ensemble."""
    if kind == "exp":
        return math.exp(-beta * epoch)
    if kind == "cos":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, horizon) / horizon))
    if kind == "linear":
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
    if z.dim() == 2:
        return F.cross_entropy(full(z), targets)
    k = z.shape[0]
    return F.cross_entropy(full(z.flatten(0, 1)), targets.repeat(k)) * k


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

    One log-softmax per tensor and one contraction instead of K^2 separate losses."""
    log_q = F.log_softmax(full(teacher_logits.detach()) / temperature, dim=-1)
    log_p = F.log_softmax(full(student_logits) / temperature, dim=-1)
    q = log_q.exp()
    batch = student_logits.shape[-2]
    neg_entropy = (q * log_q).sum((-1, -2)) / batch  # [K] teachers
    cross = torch.einsum("jbc,ibc->ij", q, log_p) / batch  # [K students, K teachers]
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
        w = math.exp(-beta * epoch)
        return {"rampup": r, "decay": w if w > REFERENCE_CUTOFF else 0.0, "dk": r}
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
    # a zero weight skips the term, as the released code does
    terms["dk_ensemble"] = kd_loss(z, others_mean(t), temperature).sum() if w > 0 else z.new_zeros(())
    loss = (terms["ce_ensemble"] + terms["ce_peers"] + r * terms["kd_ensemble"]
            + dk * (w * terms["dk_ensemble"] + (1 - w) * terms["dk_individual"]))
    return {"loss": loss, **terms, **{f"w_{name}": value for name, value in wts.items()}}
