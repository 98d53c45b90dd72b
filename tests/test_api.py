"""The Python face (dkel.fit / load / evaluate), plugins every command sees, and the recipe keys
beyond SPEC's (optimizer, warm-up, label smoothing, gradient clipping, top-5)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import dkel
from conftest import PYTHON, make_config
from dkel.cli import main
from dkel.errors import ConfigError, DataError, DkelError
from test_nothing_lost import fails

FAST = dict(epochs=1, batch_size=8, progress="none", eval_batch_size=64)


class Blobs(Dataset):
    """Tiny separable images: class c is a bright square in quadrant c; items in one of three forms."""

    def __init__(self, n: int, size: int = 16, classes: int = 3, form: str = "tensor", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        self.images = (torch.rand(n, 3, size, size, generator=g) * 60).to(torch.uint8)
        h = size // 2
        for i, c in enumerate(self.labels.tolist()):
            r, q = divmod(c, 2)
            self.images[i, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
        self.form = form
        self.classes = ["ant", "bee", "cat", "dog"][:classes]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.form == "pil":
            x = Image.fromarray(x.permute(1, 2, 0).numpy())
        elif self.form == "hwc":
            x = x.permute(1, 2, 0).numpy()
        elif self.form == "float":
            x = x.float() / 255
        return x, int(self.labels[i])


def test_fit_a_torchvision_network_on_my_own_datasets(tmp_path):
    train, test = Blobs(24, form="pil"), Blobs(12, form="hwc", seed=1)
    run = dkel.fit("dkel", model="torchvision:resnet18", data=(train, test), out=tmp_path / "run", **FAST)
    assert run.dir == tmp_path / "run" and run.results["dataset"] == "python:Blobs"
    assert json.loads((run.dir / "results.json").read_text()) == run.results
    assert not run.deployed.training
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        logits = run.deployed(x)
        assert logits.shape == (5, 3)
        loaded = dkel.load(run.dir)
        torch.testing.assert_close(loaded(x), logits)
    assert loaded.preprocessing.classes == ("ant", "bee", "cat")
    # the deployed network is torchvision's resnet18 again, under its own layer names
    import torchvision

    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(run.deployed.state_dict())
    # the run folder is an ordinary one: eval needs the Python objects again, and says so
    with pytest.raises(DataError, match="given to dkel.fit as Python objects"):
        from dkel.data import DATASETS

        DATASETS.unregister("python:Blobs")
        dkel.evaluate(run)
    acc = dkel.evaluate(run, data=(train, test))
    assert acc["teacher1"] == pytest.approx(run.results["deploy_acc"])


@pytest.mark.parametrize("model", ["timm:resnet18", "timm:vit_tiny_patch16_224"])
def test_fit_timm_networks(tmp_path, model):
    pytest.importorskip("timm")
    run = dkel.fit("dkel", model=model, data=(Blobs(16, size=32), Blobs(8, size=32, seed=1)),
                   out=tmp_path / "run", **FAST)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dkel.load(run.dir)(x), run.deployed(x))


def test_a_mixed_dml_cohort_and_a_callable_model(tmp_path):
    import torchvision

    def small_cnn(num_classes):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, num_classes))

    data = (Blobs(24, form="float"), Blobs(12, seed=1))
    run = dkel.fit("dml", model=["resnet8", "torchvision:mobilenet_v3_small", small_cnn], peers=3, data=data,
                   out=tmp_path / "dml", **FAST)
    assert {"peer1", "peer2", "peer3"} <= set(run.results["metrics"])
    assert run.results["model"][0] == "resnet8" and run.results["model"][2].startswith("python:")
    assert isinstance(torchvision.models.mobilenet_v3_small(num_classes=3), torch.nn.Module)


def test_exported_files_load_with_their_preprocessing(tmp_path):
    run = dkel.fit("pcl", model="resnet8", data="digits", out=tmp_path / "run", train_subset=100, **FAST)
    raw = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    expected = run.deployed(dkel.load(run.dir).preprocessing(raw))
    for fmt, ext in (("safetensors", ".safetensors"), ("torchscript", ".pt"), ("onnx", ".onnx")):
        main(["export", str(run.dir), "--format", fmt])
        net = dkel.load(run.dir / "export" / f"deploy{ext}")
        torch.testing.assert_close(net(net.preprocessing(raw)), expected, rtol=1e-4, atol=1e-4)


def test_bad_python_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(DkelError, match=r"train item 0: a dataset must yield \(image, label\) pairs"):
        dkel.fit("independent", model="resnet8", data=([torch.zeros(3, 8, 8)], [torch.zeros(3, 8, 8)]),
                 out=tmp_path / "a", **FAST)
    with pytest.raises(DkelError, match=r"train item 1: a tensor image must be CHW with 1 or 3 channels"):
        bad = [(torch.zeros(3, 8, 8), 0), (torch.zeros(5, 8, 8), 1)]
        dkel.fit("independent", model="resnet8", data=(bad, bad), out=tmp_path / "b", **FAST)
    with pytest.raises(DkelError, match=r"must return an nn\.Module"):
        dkel.fit("independent", model=lambda n: "not a network", data=(Blobs(8), Blobs(4)),
                 out=tmp_path / "c", **FAST)
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        dkel.fit("dkel", model="resnet8", data="digits", epoch=3)
    for name in "abc":
        assert not (tmp_path / name).exists()


# ----------------------------------------------------------------------------- plugins
PLUGIN = '''
import torch
from torch import nn
import dkel
from dkel.methods.independent import Independent
from dkel.losses import cross_entropy
from dkel.methods import StepOutput


@dkel.register_model("tinynet", input_size=8)
def tinynet(num_classes):
    """a two-stage CNN"""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class Stripes(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.zeros(1, 8, 8, dtype=torch.uint8)
        x[0, :, (i % 2) * 4:(i % 2) * 4 + 4] = 200
        return x, i % 2


@dkel.register_dataset("stripes", classes=["left", "right"])
def stripes(data_dir):
    """vertical stripes"""
    return Stripes(40), Stripes(10)


@dkel.register_method("halfce")
class HalfCE(Independent):
    """independent training at half the cross-entropy"""

    def losses(self, views, labels, epoch):
        logits = self.run("student", views).logits
        return StepOutput({"loss": 0.5 * cross_entropy(logits, labels)}, logits[0])
'''


def test_a_plugin_file_is_seen_by_every_command(tmp_path, capsys):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN)
    run = tmp_path / "run"
    main(["train", "--import", str(plugin), "--method", "halfce", "--model", "tinynet", "--dataset", "stripes",
          "--epochs", "1", "--out", str(run), "progress=none", "batch_size=8"])
    assert f"- {plugin}" in (run / "config.yaml").read_text()
    # later commands, in fresh processes, re-import what the run recorded
    for args in (["eval", str(run)], ["export", str(run), "--format", "safetensors"]):
        out = subprocess.run([PYTHON, "-m", "dkel", *args], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    listing = subprocess.run([PYTHON, "-m", "dkel", "list", "--import", str(plugin)], capture_output=True,
                             text=True).stdout
    assert "| halfce |" in listing and "| tinynet |" in listing and "| stripes |" in listing
    grid = tmp_path / "grid"
    main(["compare", "--import", str(plugin), "--methods", "halfce,dml", "--model", "tinynet", "--dataset",
          "stripes", "--seeds", "1", "--epochs", "1", "--out", str(grid), "batch_size=8"])
    table = (grid / "table.md").read_text()
    assert "| halfce |" in table.replace("`", "") or "halfce" in table
    assert "failed" not in capsys.readouterr().out.lower()
    main(["table", str(grid)])


def test_a_bad_import_is_one_line(capsys, tmp_path):
    fails(capsys, ["list", "--import", str(tmp_path / "nope.py")], r"^error: --import .*nope\.py: no such file$")
    fails(capsys, ["list", "--import", "no_such_module_xyz"], r"^error: --import no_such_module_xyz: no module named")
    (tmp_path / "broken.py").write_text("x = 1\nraise RuntimeError('boom')\n")
    fails(capsys, ["train", "--import", str(tmp_path / "broken.py"), "--out", str(tmp_path / "r")],
          r"^error: --import .*broken\.py failed at .*broken\.py:2: RuntimeError: boom$")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- recipe keys
def test_warmup_composes_with_both_schedules():
    from dkel.engine import lr_at

    cos = make_config(epochs=10, warmup_epochs=2, lr=1.0)
    steps = 5
    first = lr_at(cos, 0.0, steps)
    assert first == pytest.approx(1.0 / 10 * 0.5 * (1 + np.cos(0)))  # step 1 of 10 warm-up steps
    assert lr_at(cos, 1.0, steps) == pytest.approx(0.6 * 0.5 * (1 + np.cos(np.pi * 0.1)))
    assert lr_at(cos, 2.0, steps) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.2)))  # warm-up over
    multi = make_config(epochs=10, warmup_epochs=1, lr=1.0, schedule="multistep", milestones=[3], gamma=0.1)
    assert [round(lr_at(multi, e, 4), 6) for e in (0, 0.25, 0.75, 1, 3)] == [0.25, 0.5, 1.0, 1.0, 0.1]


def test_recipe_keys_resume_exactly(tmp_path):
    """adamw, warm-up across the epoch boundary, label smoothing and clipping: a run continued after
    epoch 1 equals the uninterrupted one bitwise (the schedule is a pure function of the step)."""
    recipe = dict(method="independent", optimizer="adamw", lr=0.003, warmup_epochs=1.5, label_smoothing=0.1,
                  grad_clip=1.0, schedule="multistep", train_subset=200, batch_size=32, progress="none")
    from dkel.engine import load_checkpoint, train

    train(make_config(epochs=2, out=str(tmp_path / "whole"), **recipe))
    train(make_config(epochs=1, out=str(tmp_path / "split"), **recipe))
    train(make_config(epochs=2, out=str(tmp_path / "split"), **recipe), resume=tmp_path / "split")
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("whole", "split"))
    assert a["stepper"]["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key


def test_label_smoothing_reaches_every_cross_entropy(tmp_path, monkeypatch):
    from dkel import losses
    from dkel.engine import train
    from dkel.methods.independent import Independent

    seen = []
    real = Independent.losses

    def spy(self, views, labels, epoch):
        out = real(self, views, labels, epoch)
        with torch.no_grad():
            logits = self.student(views).logits
        seen.append((out.losses["loss"].item(), torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.repeat(logits.shape[0]), label_smoothing=0.2).item() * logits.shape[0]))
        return out

    monkeypatch.setattr(Independent, "losses", spy)
    train(make_config(method="independent", epochs=1, label_smoothing=0.2, train_subset=100, out=str(tmp_path / "r")))
    assert seen and all(a == pytest.approx(b, rel=1e-5) for a, b in seen)
    assert losses._LABEL_SMOOTHING.get() == 0.0  # only inside training


def test_grad_clip_bounds_the_update():
    from dkel import runtime
    from dkel.config import TimeScale
    from dkel.engine import Stepper
    from dkel.methods import METHODS, Setup

    cfg = make_config(method="independent", grad_clip=1e-3, momentum=0.0, weight_decay=0.0, lr=1.0,
                      schedule="multistep")
    torch.manual_seed(0)
    method = METHODS.get("independent")(cfg, Setup("resnet8", 10, 3, 3, 1, 1, TimeScale()))
    before = [p.detach().clone() for p in method.student.parameters()]
    Stepper(cfg, method, runtime.Runtime(torch.device("cpu"), torch.float32, False))(
        torch.randn(3, 4, 3, 32, 32), torch.arange(4), 0)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(method.student.parameters(), before)])
    assert 0 < moved.norm().item() <= 1e-3 * (1 + 1e-4)


def test_top5_is_reported_next_to_top1(tmp_path, capsys):
    results = dkel.fit("independent", model="resnet8", data="digits", out=tmp_path / "r", train_subset=100, **FAST).results
    assert results["deploy_top5"] >= results["deploy_acc"]
    assert set(results["metrics_top5"]) == set(results["metrics"]) >= {"peer1", "peer2", "peer3"}
    assert "deploy_top5" in (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0]
    capsys.readouterr()
    main(["eval", str(tmp_path / "r")])
    assert "| output | top-1 | top-5 |" in capsys.readouterr().out


def test_import_of_dkel_stays_light():
    out = subprocess.run([PYTHON, "-c", "import sys, dkel; print(sorted(m for m in ('torch', 'timm', 'torchvision') "
                                        "if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_example_script_runs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "dkel_on_torchvision.py"
    out = subprocess.run([PYTHON, str(script), "--images", "24", "--epochs", "1", "--out", str(tmp_path / "shapes")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "deployed (teacher peer 1) accuracy" in out.stdout and "predicted:" in out.stdout
    assert (tmp_path / "shapes" / "results.json").is_file()


def test_fit_shows_the_runs_warnings_when_logging_is_not_configured(tmp_path, capsys, monkeypatch):
    """From Python, as from the command line, a run that ends at chance level (or with a teacher
    that copies its student) says so, not only in train.log."""
    import logging

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a plain script: no logging configured
    monkeypatch.setattr(logging.getLogger("dkel"), "handlers", [])  # (nor by an earlier `dkel` command)
    monkeypatch.setattr(logging.getLogger("dkel"), "propagate", True)
    dkel.fit("dkel", model="resnet8", data="digits", out=tmp_path / "r", train_subset=100, lr=5.0,
             divergence_check=False, **FAST)
    err = capsys.readouterr().err
    assert "warning: the EMA horizon" in err and "warning: the deployed network ended at chance level" in err
    assert err.count("ended at chance level") == 1
    assert logging.getLogger("dkel").handlers == []  # nothing left behind
