"""DKEL (Shao & Chen, arXiv 2312.11218) and PCL (Wu & Gong, AAAI 2021): one implementation.

Student: a branched network with the peer-ensemble head.  Teacher: a second branched
network of the same architecture, never sharing parameters, updated only by EMA of
the student ("temporal mean").  DKEL adds two switches to PCL: the teacher gets k
cross-entropy steps of its own before the EMA takes over (decoupled knowledge), and
each student peer also learns from the mean of the other teacher peers with a
decaying weight (decaying ensemble).  `mode=paper` is the SPEC reconstruction of the
paper (section 2: its formulas were not available); `mode=reference` reproduces the
released DKEL code (section 2.1).  PCL is this class with both switches off.

Instruments (once per epoch, on the engine's fixed probe batch): each loss term's share
of the gradient at the student peers' logits, the initial teacher's remaining weight,
student-teacher KL and agreement, and the teacher peers' mutual agreement."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..config import EMA_FLOOR_FRACTION, EMA_FLOOR_STEPS
from ..errors import ConfigError
from ..losses import (DECAYS, MODES, cross_entropy, dkel_loss, dkel_summands, gradient_shares, kd_loss,
                      off_diagonal_mean)
from .base import Method, StepOutput, ema_update, named_peers, peer_names

MIN_DECAY_EPOCHS = 3.0  # a cos/linear decay over fewer epochs cannot show its shape in an ablation


@dataclass
class DKELConfig:
    mode: str = "paper"  # paper (the SPEC reconstruction) | reference (the released code's weights, EMA warm-up, init)
    temperature: float = 3.0
    # ramp-up r(e) of the peer-ensemble term (and of DK if dk_rampup); epochs at full length
    rampup_length: float = 80.0
    rampup_max: float = 1.0
    # decaying ensemble weight w(e)
    decay: str = "exp"  # exp | cos | linear | none | const
    beta: float = 0.5  # per epoch, for exp
    decay_horizon: float = 10.0  # epochs, for cos and linear
    # decoupled-knowledge weight: lambda_dk = dk_weight (or dk_weight * ramp if dk_rampup)
    dk_weight: float = 1.0
    dk_rampup: bool = False
    # teacher initialisation: k plain SGD steps on the teacher alone before the EMA starts
    teacher_init: bool = True
    init_steps: int = 1
    init_lr: float = 0.01  # paper mode; reference mode uses lr / 100 and k + 1 steps
    ema_alpha: float = 0.999
    ema_warmup: Optional[bool] = None  # alpha_t = min(1 - 1/(t+1), alpha); default: on in reference mode
    deploy_peer: int = 1  # teacher peer that is deployed (1-based)


@dataclass
class PCLConfig:
    temperature: float = 3.0
    rampup_length: float = 80.0
    rampup_max: float = 1.0
    ema_alpha: float = 0.999
    deploy_peer: int = 1


class DKEL(Method):
    name = "dkel"
    summary = "decoupled teacher (k init steps, then EMA) teaching each peer via a decaying ensemble"
    paper = "Shao & Chen, arXiv 2312.11218"
    Config = DKELConfig
    authors_switches = ("mode=reference: the released code's loss weights, EMA warm-up and teacher "
                        "initialisation (SPEC 2.1); the default mode=paper is the SPEC reconstruction",)
    min_peers = 2

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        self.student = setup.branched(setup.peers, True)
        # same initial weights and BN buffers as the student, but never shared with it
        self.teacher = self.student.without_head().requires_grad_(False)
        time = setup.time
        self.rampup_length = time.epochs(self.hp.rampup_length)
        self.decay_horizon = time.epochs(self.hp.decay_horizon)
        self.beta = time.rate(self.hp.beta)
        self.alpha = time.ema_alpha(self.hp.ema_alpha)
        self.horizon = time.ema_horizon(self.hp.ema_alpha)  # steps, exact (not recomputed from alpha)
        self.warmup = self.hp.ema_warmup if self.hp.ema_warmup is not None else self.hp.mode == "reference"
        self.steps_done = 0  # optimizer steps so far (set by after_step), for the initial teacher's weight
        self._ema_lists: Optional[tuple[list[Tensor], list[Tensor]]] = None
        self.refuse_unshapely_decay()

    def refuse_unshapely_decay(self) -> None:
        hp, time = self.hp, self.setup.time
        if hp.mode == "paper" and hp.decay in ("cos", "linear") and time.scaled \
                and self.decay_horizon < MIN_DECAY_EPOCHS:
            raise ConfigError(
                f"decay={hp.decay}: its horizon scaled to this run is {self.decay_horizon:.3g} epochs "
                f"(decay_horizon {hp.decay_horizon:g} x time scale {time.factor:.4g}), under the "
                f"{MIN_DECAY_EPOCHS:g} epochs a decay needs to show its shape; lengthen it with "
                f"decay_horizon={math.ceil(MIN_DECAY_EPOCHS / time.factor)} (epochs at the paper's length), "
                f"or train more epochs")

    @classmethod
    def problems(cls, hp: DKELConfig, cfg) -> list[tuple[bool, str]]:
        return [
            (hp.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {hp.mode!r}"),
            (hp.decay in DECAYS, f"decay must be one of {', '.join(DECAYS)}, got {hp.decay!r}"),
            (0.0 <= hp.ema_alpha < 1.0, f"ema_alpha must be in [0, 1), got {hp.ema_alpha}"),
            (hp.init_steps >= 0, f"init_steps must be >= 0, got {hp.init_steps}"),
            (hp.init_lr > 0, f"init_lr must be > 0, got {hp.init_lr}"),
            (hp.temperature > 0, f"temperature must be > 0, got {hp.temperature}"),
            (hp.beta >= 0, f"beta must be >= 0, got {hp.beta}"),
            (hp.decay_horizon > 0 and hp.rampup_length > 0, "decay_horizon and rampup_length must be > 0"),
            (1 <= hp.deploy_peer <= cfg.peers, f"deploy_peer must be in 1..{cfg.peers}, got {hp.deploy_peer}"),
        ]

    @property
    def mode(self) -> Optional[str]:
        return self.hp.mode

    @property
    def deploy_metric(self) -> str:
        return f"teacher{self.hp.deploy_peer}"

    def time_constants(self) -> dict[str, Any]:
        time, hp = self.setup.time, self.hp
        out = time.describe()
        if hp.mode == "reference":
            out["weights_at"] = "the epoch boundaries of a paper-length run (the released code's schedule)"
        out.update({"rampup_epochs": self.rampup_length, "beta_per_epoch": self.beta})
        if hp.mode == "paper" and hp.decay in ("cos", "linear"):
            out["decay_horizon_epochs"] = self.decay_horizon
        out.update({"ema_alpha": self.alpha, "ema_horizon_steps": self.horizon, "ema_warmup": self.warmup})
        scaled = time.factor / (1.0 - hp.ema_alpha)
        if time.scaled and self.horizon > scaled * (1 + 1e-9):  # the floor lengthened it
            out["ema_horizon_before_floor_steps"] = scaled
        return out

    def warnings(self) -> list[str]:
        out, horizon, steps = [], self.horizon, self.setup.time.run_steps
        if horizon < EMA_FLOOR_STEPS * (1 - 1e-9):
            out.append(f"the EMA horizon is {horizon:.3g} steps (ema_alpha {self.alpha:.4g}), under "
                       f"{EMA_FLOOR_STEPS}: the teacher nearly copies its student, so decoupling cannot show; "
                       f"train longer (more epochs or a smaller batch) or raise ema_alpha")
        if steps and horizon > steps * EMA_FLOOR_FRACTION:
            start = self.alpha ** max(steps - (horizon if self.warmup else 0), 0)
            out.append(f"the EMA horizon ({horizon:.4g} steps) exceeds a third of this {steps}-step run: at the "
                       f"end the teacher still holds {start:.0%} of its start; shorten it with ema_alpha, "
                       f"paper_epochs or time_scale")
        return out

    # -- teacher initialisation ------------------------------------------------------------
    def init_schedule(self) -> tuple[int, float]:
        """(steps, lr) of the teacher initialisation."""
        if not self.hp.teacher_init or self.hp.init_steps == 0:
            return 0, 0.0
        if self.hp.mode == "reference":  # the released loop breaks after step k, so it runs k + 1
            return self.hp.init_steps + 1, self.cfg.lr / 100
        return self.hp.init_steps, self.hp.init_lr

    def prepare(self, batches: Iterator[tuple[Tensor, Tensor]]) -> None:
        steps, lr = self.init_schedule()
        if steps == 0:
            return
        params = list(self.teacher.parameters())
        opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=self.cfg.weight_decay)
        self.teacher.train().requires_grad_(True)
        for _, (views, labels) in zip(range(steps), batches):
            opt.zero_grad(set_to_none=True)
            logits = self.teacher(views).logits
            (cross_entropy(logits, labels) / self.setup.peers).backward()
            opt.step()
        self.teacher.requires_grad_(False)
        for p in params:
            p.grad = None

    # -- training step ---------------------------------------------------------------------
    def schedule(self, progress: float) -> tuple[float, dict[str, Any]]:
        """(epoch, keyword arguments) for `dkel_loss`/`dkel_weights` at `progress` epochs."""
        hp, time = self.hp, self.setup.time
        if hp.mode == "reference":  # the released weights are a function of the epoch number
            return time.paper_epoch(progress), {"mode": "reference", "beta": hp.beta,
                                                "rampup_length": hp.rampup_length}
        return time.at(progress), {"mode": "paper", "beta": self.beta, "decay": hp.decay,
                                   "decay_horizon": self.decay_horizon, "rampup_length": self.rampup_length,
                                   "rampup_max": hp.rampup_max, "dk_weight": hp.dk_weight,
                                   "dk_rampup": hp.dk_rampup}

    def losses(self, views: Tensor, labels: Tensor, progress: float) -> StepOutput:
        with torch.no_grad():  # first: its activations are freed before the student's are made
            teacher = self.run("teacher", views).logits
        out = self.run("student", views)
        epoch, schedule = self.schedule(progress)
        terms = dkel_loss(out.logits, out.ensemble, teacher, labels, epoch, temperature=self.hp.temperature,
                          **schedule)
        k = out.logits.shape[0]
        monitors = {"student_logit_norm": out.logits.detach().float().norm(dim=-1).mean(),
                    "teacher_logit_norm": teacher.float().norm(dim=-1).mean(),
                    "student_teacher_kd": terms["dk_individual"].detach() / k}  # tau^2 KL, mean over pairs i != j
        return StepOutput(terms, out.logits[0], monitors)

    def after_step(self, step: int) -> None:
        if self._ema_lists is None:
            student = dict(self.student.named_parameters())
            names = [n for n, _ in self.teacher.named_parameters()]
            self._ema_lists = ([p.data for _, p in self.teacher.named_parameters()],
                               [student[n].data for n in names])
        alpha = self.alpha
        if self.warmup:  # the released code's alpha_t = min(1 - 1/(t+1), alpha)
            warming = 1.0 - 1.0 / (step + 1)
            alpha = warming.clamp(max=alpha) if isinstance(warming, Tensor) else min(warming, alpha)
        ema_update(*self._ema_lists, alpha)
        self.steps_done = step + 1

    def initial_teacher_weight(self) -> float:
        """The weight the teacher still gives its initial (initialised) weights: the product of the
        EMA factors so far, alpha^t; with the warm-up alpha_0 = 0, so 0 after the first step."""
        if self.warmup:
            return 1.0 if self.steps_done == 0 else 0.0
        return self.alpha ** int(self.steps_done)

    # -- instruments (the per-step logit norms and student-teacher KD are the step's monitors)
    def epoch_diagnostics(self, probe: tuple[Tensor, Tensor], progress: float) -> dict[str, float]:
        views, labels = probe
        out = {"param_norm": torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
            [p.detach().float() for p in self.student.parameters()]))).item(),
            "init_teacher_weight": self.initial_teacher_weight()}
        buffers = [b.clone() for b in self.buffers()]  # train-mode forwards move the BN statistics
        with torch.no_grad():
            teacher = self.teacher(views).logits.float()
            shared = self.teacher(views[0]).logits.float()  # every teacher peer on the same images
            student = self.student(views)
        for b, saved in zip(self.buffers(), buffers):
            b.copy_(saved)
        z = student.logits.float().requires_grad_(True)
        epoch, schedule = self.schedule(progress)
        terms = dkel_loss(z, student.ensemble.float(), teacher, labels, epoch, temperature=self.hp.temperature,
                          **schedule)
        weights = {k[2:]: v for k, v in terms.items() if k.startswith("w_")}
        parts = dkel_summands(terms, weights)
        del parts["ce_ensemble"]  # acts on the ensemble head's logits, not on the peers'
        out.update({f"grad_share_{name}": value for name, value in gradient_shares(parts, z).items()})
        agree = (shared.argmax(-1)[:, None] == shared.argmax(-1)[None]).float().mean(-1)  # [K, K] peer pairs
        out.update({
            "probe_kl_student_teacher": kd_loss(z.detach(), teacher, temperature=1.0).mean().item(),
            "probe_agree_student_teacher": (z.argmax(-1) == teacher.argmax(-1)).float().mean().item(),
            "probe_agree_teacher_peers": off_diagonal_mean(agree).mean().item(),
        })
        return out

    # -- evaluation and deployment ---------------------------------------------------------
    def eval_logits(self, x: Tensor) -> dict[str, Tensor]:
        student = self.student(x)
        teacher = self.teacher(x).logits
        return {**named_peers("teacher", teacher), "teacher_ensemble": teacher.mean(0),
                **named_peers("student", student.logits), "student_ensemble": student.ensemble}

    def peer_groups(self) -> dict[str, list[str]]:
        k = self.setup.peers
        return {"teacher": peer_names("teacher", k), "student": peer_names("student", k)}

    def deploy(self) -> nn.Module:
        return self.teacher.deploy(self.hp.deploy_peer)


class PCL(DKEL):
    name = "pcl"
    summary = "peer ensemble head + temporal-mean (EMA) teacher peers, no init, no decaying ensemble"
    paper = "Wu & Gong, AAAI 2021"
    Config = PCLConfig
    authors_switches = ()

    @classmethod
    def settings(cls, cfg) -> DKELConfig:
        """PCL as DKEL's configuration: paper weights, DK ramped like the ensemble term,
        no teacher initialisation, no decaying ensemble, mean-teacher EMA warm-up."""
        return DKELConfig(mode="paper", temperature=cfg.temperature, rampup_length=cfg.rampup_length,
                          rampup_max=cfg.rampup_max, decay="none", dk_weight=cfg.rampup_max, dk_rampup=True,
                          teacher_init=False, init_steps=0, ema_alpha=cfg.ema_alpha, ema_warmup=True,
                          deploy_peer=cfg.deploy_peer)

    @property
    def mode(self) -> Optional[str]:
        return None
