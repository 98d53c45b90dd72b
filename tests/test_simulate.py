"""The 2D simulation: the vectorised update against a plain loop, outputs, summary."""
import csv
import dataclasses
import math

import numpy as np
import pytest

from dkel import simulate as sim
from dkel.cli import main
from dkel.errors import DkelError
from dkel.losses import sigmoid_rampup


def _unit(x, y):
    n = math.hypot(x, y)
    return (x / n, y / n) if n > 1e-12 else (0.0, 0.0)


def _w(kind, epoch, beta, horizon):
    return {"none": 0.0, "exp": math.exp(-beta * epoch),
            "cos": 0.5 * (1 + math.cos(math.pi * min(epoch, horizon) / horizon)),
            "linear": max(0.0, 1 - epoch / horizon)}[kind]


def loop_trial(start, cfg, variant):
    """One trial written out point by point from SPEC section 5, as plain Python."""
    k = len(start)
    s = [list(p) for p in start]
    t = [list(p) for p in start]
    if variant.teacher_init:
        lr0 = cfg.lr if cfg.init_lr is None else cfg.init_lr
        for _ in range(cfg.init_steps):
            for p in t:
                ux, uy = _unit(-p[0], -p[1])
                p[0] += lr0 * ux
                p[1] += lr0 * uy
    gaps = [sum(math.hypot(*p) for p in t) / k]
    for epoch in range(cfg.epochs):
        w = _w(variant.decay, epoch, cfg.beta, cfg.decay_horizon)
        r = sigmoid_rampup(epoch, cfg.rampup) if cfg.rampup else 1.0
        ens_w = cfg.ensemble_weight * r
        teacher_w = cfg.teacher_weight * (r if variant.name == "pcl" else 1.0)
        for _ in range(cfg.steps_per_epoch):
            ex, ey = sum(p[0] for p in s) / k, sum(p[1] for p in s) / k
            new = []
            for i, (x, y) in enumerate(s):
                if cfg.teacher_target == "others":
                    targets = [t[j] for j in range(k) if j != i]
                    mean = (sum(p[0] for p in targets) / (k - 1), sum(p[1] for p in targets) / (k - 1))
                else:
                    targets = [t[i]]
                    mean = (sum(p[0] for p in t) / k, sum(p[1] for p in t) / k)
                px, py = _unit(-x, -y)  # ground truth at the origin
                ux, uy = _unit(ex - x, ey - y)
                px, py = px + ens_w * ux, py + ens_w * uy
                ind = [_unit(p[0] - x, p[1] - y) for p in targets]
                ix, iy = sum(u[0] for u in ind) / len(ind), sum(u[1] for u in ind) / len(ind)
                mx, my = _unit(mean[0] - x, mean[1] - y)
                px += teacher_w * ((1 - w) * ix + w * mx)
                py += teacher_w * ((1 - w) * iy + w * my)
                new.append([x + cfg.lr * px, y + cfg.lr * py])
            s = new
            t = [[cfg.ema * a[0] + (1 - cfg.ema) * b[0], cfg.ema * a[1] + (1 - cfg.ema) * b[1]] for a, b in zip(t, s)]
        gaps.append(sum(math.hypot(*p) for p in t) / k)
    return gaps, s, t


@pytest.mark.parametrize("target,rampup,peers", [("others", 0.0, 3), ("own", 0.0, 3), ("others", 8.0, 4)])
def test_vectorised_update_equals_plain_loop(target, rampup, peers):
    cfg = sim.SimConfig(trials=4, epochs=12, peers=peers, steps_per_epoch=2, radius=2.0, init_steps=2,
                        teacher_target=target, ensemble_weight=0.7, teacher_weight=1.3, rampup=rampup, seed=3)
    starts = sim.initial_points(cfg)
    for name in ("pcl", "dk", "dkel", "dkel_cos", "dkel_linear"):
        variant = sim.VARIANTS[name]
        gaps, path = sim.run_variant(starts, cfg, variant, keep_path=True)
        for n in range(cfg.trials):
            ref_gaps, ref_s, ref_t = loop_trial(starts[n].tolist(), cfg, variant)
            np.testing.assert_allclose(gaps[:, n], ref_gaps, rtol=1e-10, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(path[-1, 0, n], ref_s, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(path[-1, 1, n], ref_t, rtol=1e-10, atol=1e-12)


def test_trials_are_paired_and_seeded():
    cfg = sim.SimConfig(trials=50, epochs=5, measure="student")
    a, b = sim.simulate(cfg), sim.simulate(cfg)
    for name in cfg.variants:
        np.testing.assert_array_equal(a[name], b[name])
    # the same initial student points for every variant
    for name in cfg.variants:
        np.testing.assert_array_equal(a[name][0], a["pcl"][0])
    # the teacher initialisation moves each teacher lr closer to the ground truth (disc: none start within lr)
    t = sim.simulate(dataclasses.replace(cfg, measure="teacher", radius=5.0))
    assert t["dk"][0].mean() < t["pcl"][0].mean()


@pytest.mark.parametrize("init", sim.INITS)
def test_initial_points(init):
    cfg = sim.SimConfig(trials=2000, init=init, radius=2.0, distance=6.0)
    p = sim.initial_points(cfg)
    assert p.shape == (2000, 3, 2)
    r = np.linalg.norm(p, axis=-1)
    if init == "disc":
        assert r.max() <= 2.0 and abs(r.mean() - 4 / 3) < 0.05  # mean radius of a uniform disc: 2R/3
    if init == "cluster":
        assert 4.0 <= r.min() and r.max() <= 8.0


def test_convergence_definitions():
    cfg = sim.SimConfig(lr=0.1, epochs=6, final_window=2)  # epoch 10 is clipped to the last epoch
    curve = np.array([1.0, 0.5, 0.15, 0.25, 0.1, 0.1, 0.1])
    assert sim.convergence_epoch(curve, cfg) == 2
    assert sim.convergence_epoch(curve, dataclasses.replace(cfg, convergence="stay")) == 4
    assert sim.convergence_epoch(curve + 1, cfg) is None
    rows = sim.summary({"pcl": np.tile(curve[:, None], (1, 3)), "dk": np.tile(curve[:, None] - 0.01, (1, 3))}, cfg)
    assert rows[0]["final_gap"] == pytest.approx(0.1)
    assert rows[1]["final_diff"][0] == pytest.approx(-0.01) and rows[1]["epoch10_diff"][0] == pytest.approx(-0.01)


def test_bad_options_are_one_line_errors():
    with pytest.raises(DkelError, match="unknown variant"):
        sim.simulate(sim.SimConfig(variants=("pcl", "nope")))
    with pytest.raises(DkelError, match="peers"):
        sim.simulate(sim.SimConfig(peers=1))


def test_cli_writes_csv_png_and_trajectory(tmp_path, capsys):
    main(["simulate", "--trials", "200", "--epochs", "20", "--out", str(tmp_path), "--trajectory"])
    printed = capsys.readouterr().out
    assert "| dkel |" in printed and "converged" in printed
    with open(tmp_path / "simulation.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "pcl", "dk", "dkel", "dkel_cos", "dkel_linear"]
    assert len(rows) == 1 + 21 and rows[-1][0] == "20"
    assert all(float(v) > 0 for v in rows[-1][1:])
    for name in ("simulation.png", "trajectory.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
