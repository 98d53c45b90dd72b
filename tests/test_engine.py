import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch
import yaml

from conftest import PYTHON, make_config
from dkel import runtime
from dkel.engine import EpochMeter, load_checkpoint, train
from dkel.errors import TrainingStopped
from dkel.methods import StepOutput

RESULT_KEYS = {"method", "mode", "model", "dataset", "seed", "epochs", "world_size", "deploy_acc",
               "best_deploy_acc", "metrics"}


def test_dkel_run_folder_and_results(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dkel")
    results = train(make_config(method="dkel", epochs=2, out=str(tmp_path / "run")))
    run = tmp_path / "run"
    for name in ("config.yaml", "env.json", "metrics.csv", "train.log", "results.json", "curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved == results and RESULT_KEYS <= set(saved)
    assert saved["mode"] == "paper" and saved["world_size"] == 1 and saved["epochs"] == 2
    assert 0.0 <= saved["deploy_acc"] <= 1.0 and saved["deploy_acc"] == saved["metrics"]["teacher1"]
    assert {"teacher_mean", "teacher_max", "teacher_ensemble", "student_mean", "student_ensemble"} <= set(saved["metrics"])
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "student_logit_norm" in rows[0] and "param_norm" in rows[0]
    for instrument in ("grad_share_ce_peers", "grad_share_dk_individual", "init_teacher_weight",
                       "probe_kl_student_teacher", "probe_agree_student_teacher", "probe_agree_teacher_peers"):
        assert instrument in rows[0].split(","), instrument
    # the scaled constants are printed once, at the start, and stored
    assert (run / "train.log").read_text().count("time constants") == 1
    assert saved["time_constants"]["time_scale"] == pytest.approx(2 / 300)
    assert saved["time_constants"]["ema_horizon_steps"] == 8  # a third of the 24-step run
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "dkel"
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "git_sha" in env
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"method", "stepper", "rng", "epoch", "history", "best"} <= set(ckpt) and ckpt["epoch"] == 1
    assert {"optimizer", "scaler", "step"} <= set(ckpt["stepper"]) and ckpt["stepper"]["step"] == 24
    assert any(k.startswith("teacher.") for k in ckpt["method"])


def test_default_run_folder_layout(tmp_path):
    train(make_config(method="independent", epochs=1, runs_dir=str(tmp_path), seed=3, train_subset=200))
    assert (tmp_path / "digits" / "independent-resnet8" / "default-seed3" / "results.json").is_file()


def test_existing_run_folder_is_not_overwritten_silently(tmp_path):
    cfg = make_config(method="independent", epochs=1, out=str(tmp_path), train_subset=200)
    train(cfg)
    from dkel.errors import DkelError

    with pytest.raises(DkelError, match="already exists.*--resume"):
        train(cfg)
    train(cfg, overwrite=True)


def state(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    args = ["-m", "dkel", "train", "--method", "dkel", "--epochs", "4", "--batch-size", "32", "progress=none",
            "train_subset=640",
            "threads=2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([PYTHON, *args, "--out", str(whole)], check=True, capture_output=True)
    proc = subprocess.Popen([PYTHON, *args, "--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    assert state(killed)["epoch"] < 3
    subprocess.run([PYTHON, "-m", "dkel", "train", "--resume", str(killed)], check=True, capture_output=True)
    a, b = state(whole), state(killed)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key
    assert a["stepper"]["step"] == b["stepper"]["step"]
    for pa, pb in zip(a["stepper"]["optimizer"]["state"].values(), b["stepper"]["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    drop = ("epoch_time_s", "img_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a["history"]] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b["history"]]


def test_non_finite_loss_stops_and_keeps_last_good_state(tmp_path, exploding):
    with pytest.raises(TrainingStopped, match=r"loss became nan in epoch 2.*state after epoch 1 is kept"):
        train(make_config(method="exploding", epochs=3, out=str(tmp_path), train_subset=300))
    ckpt = state(tmp_path)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 2
    assert not (tmp_path / "results.json").exists()


def test_collapse_is_detected_and_stops(tmp_path):
    """Weight decay this strong drives every weight, hence every logit, to zero."""
    with pytest.raises(TrainingStopped, match="collapsed.*logit norm"):
        train(make_config(method="dkel", epochs=6, weight_decay=50.0, lr=0.01, momentum=0.0, out=str(tmp_path)))
    assert state(tmp_path)["epoch"] < 5


@pytest.mark.parametrize("precision", ["bf16"])
def test_bf16_autocast_on_cpu_trains(tmp_path, precision):
    results = train(make_config(method="dkel", epochs=1, precision=precision, out=str(tmp_path)))
    assert 0 <= results["deploy_acc"] <= 1


def test_epoch_meter_averages_losses_and_monitors_over_steps():
    meter = EpochMeter(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    for loss, norm in ((1.0, 4.0), (3.0, 8.0)):
        meter.add(StepOutput({"loss": torch.tensor(loss), "w": 0.5}, logits, {"norm": torch.tensor(norm)}),
                  torch.tensor([0, 0]))
    row = meter.row(runtime.Runtime(torch.device("cpu"), torch.float32, False))
    assert row["train_loss"] == 2.0 and row["norm"] == 6.0 and row["w"] == 0.5 and row["train_acc"] == 0.5
    assert list(row)[-1] == "norm"  # monitors come after the loss terms and weights
