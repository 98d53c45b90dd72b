import json
import subprocess

import pytest

from conftest import PYTHON
from dkel.engine import evaluate_run


def test_two_process_gloo_run_ends_with_identical_ranks(tmp_path):
    """CPU DDP (gloo), 2 processes, 1 epoch of DKEL on the embedded default."""
    out = tmp_path / "ddp"
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dkel", "train", "--epochs", "1", "--out", str(out), "threads=1",
                           "progress=none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["ranks_identical"] is True  # students and teachers, bitwise
    # the sharded evaluation counted every test image exactly once
    acc, deployed = evaluate_run(out, device="cpu")
    assert acc[deployed] == pytest.approx(results["deploy_acc"], abs=1e-12)
    assert {k: v for k, v in acc.items() if not k.endswith("_top5")} == pytest.approx(results["metrics"], abs=1e-12)
    assert acc["teacher1_top5"] == pytest.approx(results["metrics_top5"]["teacher1"], abs=1e-12)
    # and the run continues in a single process
    subprocess.run([PYTHON, "-m", "dkel", "train", "--resume", str(out), "epochs=2"], check=True,
                   capture_output=True, timeout=300)
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["world_size"] == 1 and resumed["epochs"] == 2
    assert len((out / "metrics.csv").read_text().splitlines()) == 3


def test_two_process_gloo_stream_run_shards_and_evaluates_exactly(tmp_path):
    """The stream backend under torchrun: identical ranks, and an exact sharded evaluation of an odd test split."""
    from test_stream import write_folder

    data = write_folder(tmp_path / "data", n_train=6, n_val=3)  # 9 test images: 5 on rank 0, 4 on rank 1
    out = tmp_path / "ddp"
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dkel", "train", "--epochs", "1", "--out", str(out), "--dataset", "imagefolder",
                           "--data-dir", str(data), "--batch-size", "6", "data_backend=stream", "image_size=16",
                           "num_workers=1", "threads=1", "progress=none", "eval_batch_size=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["ranks_identical"] is True
    acc, deployed = evaluate_run(out, device="cpu")  # one process, every test image
    assert {k: v for k, v in acc.items() if not k.endswith("_top5")} == pytest.approx(results["metrics"], abs=1e-12)
