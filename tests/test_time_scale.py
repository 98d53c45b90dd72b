"""time_scale: the paper's time constants stretched to a run, evaluated at fractional progress,
the identity at the paper's length, the EMA horizon's floor, and the refusal of decays too short
to show their shape."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_config
from dkel import runtime
from dkel.config import TimeScale, load_yaml, resolve
from dkel.data import DATASETS
from dkel.engine import Stepper, build
from dkel.errors import ConfigError
from dkel.methods import METHODS, Setup, method_configs
from dkel.schedules import decay_curves

REPO = Path(__file__).resolve().parents[1]


def method_for(name, time, **values):
    cfg = make_config(method=name, **values)
    torch.manual_seed(0)
    return METHODS.get(name)(cfg, Setup("resnet8", 10, 1, 3, cfg.epochs, 12, time))


@pytest.mark.parametrize("batch,subset,steps_per_epoch", [(128, None, 391), (256, None, 196), (128, 1000, 8),
                                                          (64, None, 782)])
def test_auto_is_the_identity_at_the_papers_length(batch, subset, steps_per_epoch):
    """300 epochs of CIFAR: the paper's constants exactly, whatever the batch size or subset (the step
    count per epoch is counted as one process would, so the process count cannot enter either)."""
    path = REPO / "configs" / "cifar100" / "dkel_resnet32.yaml"
    cfg = resolve([(str(path), load_yaml(path)), ("test", {"batch_size": batch, "train_subset": subset})],
                  method_configs())
    time = TimeScale.for_run(cfg.time_scale, cfg.epochs, steps_per_epoch, DATASETS.get("cifar100").paper_epochs)
    assert time.factor == 1.0 and not time.scaled
    method = METHODS.get("dkel")(cfg, Setup("resnet32", 100, 3, 3, cfg.epochs, steps_per_epoch, time))
    assert method.alpha == 0.999 and method.beta == 0.5 and method.rampup_length == 80.0
    # 2,400 steps: the 1,000-step horizon is left alone, but the run is told it is long for them
    assert bool(method.warnings()) == (subset is not None)


def test_a_dataset_without_recipe_is_not_scaled_unless_paper_epochs_is_set(monkeypatch):
    """Through the engine's build: the dataset's recipe, the user's paper_epochs, or no scaling."""
    entry = DATASETS._entries["digits"]
    monkeypatch.setitem(DATASETS._entries, "digits", dataclasses.replace(
        entry, obj=dataclasses.replace(entry.obj, paper_epochs=None)))
    rt = runtime.setup("cpu", "fp32", False)
    unscaled = build(make_config(method="dkel", epochs=30, train_subset=200), rt).method
    assert unscaled.setup.time.factor == 1.0 and unscaled.alpha == 0.999
    assert any("exceeds a third" in w for w in unscaled.warnings())  # 1000 steps in a 60-step run
    scaled = build(make_config(method="dkel", epochs=30, train_subset=200, paper_epochs=60), rt).method
    assert scaled.setup.time.factor == 0.5 and scaled.time_constants()["paper_epochs"] == 60


def test_the_default_run_records_an_ema_horizon_of_at_least_100_steps():
    """`dkel train` with every default (the README's first command): digits, 30 epochs, 360 steps."""
    method = build(make_config(), runtime.setup("cpu", "fp32", False)).method
    consts = method.time_constants()
    assert consts["ema_horizon_steps"] >= 100 and method.warnings() == []
    assert consts["time_scale"] == pytest.approx(0.1) and consts["weights_at"] == "fractional epoch"


def test_ema_horizon_floor():
    assert TimeScale(0.05, run_steps=1185).ema_horizon(0.999) == 100  # 50 steps scaled, floored to 100
    assert TimeScale(2 / 300, run_steps=24).ema_horizon(0.999) == 8  # 6.7 steps in a 24-step run: a third of it
    assert TimeScale(0.05, run_steps=1185).ema_horizon(0.95) == pytest.approx(20)  # never below its own
    assert TimeScale(2.0, run_steps=10_000).ema_horizon(0.999) == pytest.approx(2000)
    assert TimeScale(1.0, run_steps=50).ema_alpha(0.999) == 0.999  # the identity is exact
    short = method_for("dkel", TimeScale.for_run("auto", 2, 12, 300))  # `dkel train --epochs 2`
    assert short.alpha == pytest.approx(1 - 1 / 8)
    assert any("nearly copies its student" in w for w in short.warnings())
    floored = short.time_constants()
    assert floored["ema_horizon_steps"] == 8 and floored["ema_horizon_before_floor_steps"] == pytest.approx(6.67, 0.01)


def test_weights_follow_fractional_progress_when_scaled():
    """The engine's Stepper hands the methods epoch + fraction; scaled runs weigh each step."""
    scaled = method_for("dkel", TimeScale(1 / 12, run_steps=300), epochs=25)
    assert scaled.beta == pytest.approx(6.0)
    stepper = Stepper(scaled.cfg, scaled, runtime.setup("cpu", "fp32", False))
    g = torch.Generator().manual_seed(0)
    views, labels = torch.randn(3, 8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    out = stepper(views, labels, 0, 0.25).losses
    assert out["w_decay"] == pytest.approx(math.exp(-6 * 0.25))
    assert out["w_rampup"] == pytest.approx(math.exp(-5 * (1 - 0.25 / (80 / 12)) ** 2))
    unscaled = method_for("dkel", TimeScale(), epochs=300)
    assert unscaled.losses(views, labels, 0.75).losses["w_decay"] == 1.0  # the paper's per-epoch weights
    cl = method_for("cl", TimeScale(0.1))
    assert cl.kd_weight(0.5) == pytest.approx(math.exp(-5 * (1 - 0.5 / 8) ** 2))
    assert method_for("cl", TimeScale()).kd_weight(0.5) == pytest.approx(math.exp(-5))


def test_reference_mode_keeps_the_released_schedule_stretched():
    """The released weights are a function of the epoch number: a scaled run steps through the
    paper's epochs, r = 6.7e-4 in its epoch 0, 0 until its epoch 80, 0.1 from 81."""
    method = method_for("dkel", TimeScale(1 / 12, run_steps=2000), mode="reference", epochs=25)
    g = torch.Generator().manual_seed(0)
    views, labels = torch.randn(3, 8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    weights = {p: method.losses(views, labels, p).losses for p in (0.05, 0.09, 6.70, 6.76)}
    assert weights[0.05]["w_rampup"] == pytest.approx(0.1 * math.exp(-5)) and weights[0.05]["w_decay"] == 1.0
    assert weights[0.09]["w_rampup"] < 1e-170 and weights[0.09]["w_decay"] == pytest.approx(math.exp(-0.5))
    assert weights[6.70]["w_rampup"] == 0.0 and weights[6.76]["w_rampup"] == 0.1


@pytest.mark.parametrize("decay", ["cos", "linear"])
def test_a_decay_shorter_than_three_epochs_is_refused(decay):
    time = TimeScale(25 / 300, run_steps=2000)
    with pytest.raises(ConfigError, match=r"0.833 epochs.*decay_horizon=36"):
        method_for("dkel", time, decay=decay)
    assert method_for("dkel", time, decay=decay, decay_horizon=36).decay_horizon == pytest.approx(3.0)
    method_for("dkel", time, decay="exp")  # the default decay has no horizon to ablate
    method_for("dkel", TimeScale(), decay=decay, decay_horizon=2)  # unscaled: the user's own horizon


def test_schedules_at_25_epochs_show_three_different_decays():
    curves = decay_curves(25)
    for a, b in (("exp", "cos"), ("exp", "linear"), ("cos", "linear")):
        assert np.abs(curves[a] - curves[b]).max() > 0.1, (a, b)
    one = np.searchsorted(curves["epoch"], 1.0)  # 25 of 300 epochs: every decay is over within epoch 1
    for kind in ("exp", "cos", "linear"):
        assert curves[kind][0] == 1.0 and curves[kind][one] <= math.exp(-6)
        assert len(np.unique(np.round(curves[kind][:one], 6))) > 50  # a curve over the steps, not a step
