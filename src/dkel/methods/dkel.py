"""DKEL (Shao & Chen, arXiv 2312.11218) and PCL (Wu & Gong, AAAI 2021): one implementation.

Student: a branched network with the peer-ensemble head.  Teacher: a second branched
network of the same architecture, never sharing parameters, updated only by EMA of
the student ("temporal mean").  DKEL adds two switches to PCL: the teacher gets k
cross-entropy steps of its own before the EMA takes over (decoupled knowledge), and
each student peer also learns from the mean of the other teacher peers with a
decaying weight (decaying ensemble).  `mode=reference` reproduces the released DKEL
code instead of the paper (SPEC section 2.1).  PCL is this class with both switches off."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .. import models
from ..losses import DECAYS, MODES, cross_entropy, dkel_loss
from .base import Method, StepOutput, ema_update, named_peers, peer_names


@dataclass
class DKELConfig:
    mode: str = "paper"  # paper | reference (the released code's weights, EMA warm-up and init)
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
    min_peers = 2

    def __init__(self, cfg, setup):
        super().__init__(cfg, setup)
        self.student = models.create_branched(setup.model, setup.num_classes, setup.peers, True, setup.in_channels)
        # same initial weights and BN buffers as the student, but never shared with it
        self.teacher = self.student.without_head().requires_grad_(False)
        time = setup.time
        self.rampup_length = time.epochs(self.hp.rampup_length)
        self.decay_horizon = time.epochs(self.hp.decay_horizon)
        self.beta = time.rate(self.hp.beta)
        self.alpha = time.ema_alpha(self.hp.ema_alpha)
        self.warmup = self.hp.ema_warmup if self.hp.ema_warmup is not None else self.hp.mode == "reference"
        self._ema_lists: Optional[tuple[list[Tensor], list[Tensor]]] = None

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

    def run_tag(self) -> str:
        return self.hp.mode

    @property
    def mode(self) -> Optional[str]:
        return self.hp.mode

    @property
    def deploy_metric(self) -> str:
        return f"teacher{self.hp.deploy_peer}"

    def time_constants(self) -> dict[str, float]:
        return {"rampup_epochs": self.rampup_length, "beta_per_epoch": self.beta,
                "decay_horizon_epochs": self.decay_horizon, "ema_alpha": self.alpha,
                "ema_horizon_steps": 1.0 / (1.0 - self.alpha) if self.alpha < 1 else float("inf")}

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
    def losses(self, views: Tensor, labels: Tensor, epoch: int) -> StepOutput:
        with torch.no_grad():  # first: its activations are freed before the student's are made
            teacher = self.run("teacher", views).logits
        out = self.run("student", views)
        hp = self.hp
        terms = dkel_loss(out.logits, out.ensemble, teacher, labels, epoch, mode=hp.mode,
                          temperature=hp.temperature, beta=self.beta, decay=hp.decay,
                          decay_horizon=self.decay_horizon, rampup_length=self.rampup_length,
                          rampup_max=hp.rampup_max, dk_weight=hp.dk_weight, dk_rampup=hp.dk_rampup)
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
        alpha = min(1.0 - 1.0 / (step + 1), self.alpha) if self.warmup else self.alpha
        ema_update(*self._ema_lists, alpha)

    # -- collapse monitor (the per-step logit norms and student-teacher KD are the step's monitors)
    def epoch_diagnostics(self) -> dict[str, float]:
        return {"param_norm": torch.linalg.vector_norm(
            torch.stack(torch._foreach_norm([p.detach().float() for p in self.student.parameters()]))).item()}

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
        return self.teacher.deploy(self.hp.deploy_peer - 1)


class PCL(DKEL):
    name = "pcl"
    summary = "peer ensemble head + temporal-mean (EMA) teacher peers, no init, no decaying ensemble"
    paper = "Wu & Gong, AAAI 2021"
    Config = PCLConfig

    @classmethod
    def settings(cls, cfg) -> DKELConfig:
        """PCL as DKEL's configuration: paper weights, DK ramped like the ensemble term,
        no teacher initialisation, no decaying ensemble, mean-teacher EMA warm-up."""
        return DKELConfig(mode="paper", temperature=cfg.temperature, rampup_length=cfg.rampup_length,
                          rampup_max=cfg.rampup_max, decay="none", dk_weight=cfg.rampup_max, dk_rampup=True,
                          teacher_init=False, init_steps=0, ema_alpha=cfg.ema_alpha, ema_warmup=True,
                          deploy_peer=cfg.deploy_peer)

    def run_tag(self) -> str:
        return "default"

    @property
    def mode(self) -> Optional[str]:
        return None
