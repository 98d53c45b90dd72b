"""Every bad input ends with a non-zero exit and one line naming the problem, never a traceback."""
import json
import subprocess

import pytest

from conftest import PYTHON
from dkel.cli import main
from test_data import solid, write_image_folder


def fails(capsys, args, pattern):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    import re

    assert re.search(pattern, err[-1]), err[-1]
    return err[-1]


@pytest.fixture
def folder(tmp_path):
    write_image_folder(tmp_path / "imgs")
    return tmp_path


TRAIN = ["train", "--epochs", "1", "progress=none"]


@pytest.mark.parametrize("args,pattern", [
    (["--method", "dkell"], r"^error: unknown method 'dkell' \(did you mean 'dkel'\?\); valid: .*independent"),
    (["--model", "resnet9"], r"^error: unknown model 'resnet9'.*valid: resnet8, resnet14"),
    (["--dataset", "cifar11"], r"^error: unknown dataset 'cifar11'.*valid: digits, cifar10"),
    (["epoch=3"], r"^error: unknown config key 'epoch' in overrides \(did you mean 'epochs'\?\)"),
    (["betta=0.1"], r"unknown config key 'betta'.*did you mean 'beta'"),
    (["--method", "independent", "beta=0.1"], r"unknown config key 'beta'"),
    (["epochs=abc"], r"^error: config key 'epochs'.*could not be converted to Integer"),
    (["--epochs", "0"], r"^error: epochs must be >= 1, got 0"),
    (["--peers", "0"], r"^error: peers must be >= 1, got 0"),
    (["--peers", "1"], r"^error: method dkel needs peers >= 2, got 1"),
    (["--batch-size", "0"], r"^error: batch_size must be >= 1, got 0"),
    (["--mode", "papr"], r"^error: mode must be one of paper, reference"),
    (["noequals"], r"^error: override 'noequals' is not key=value"),
    (["--model", "torchvision:resnet19"], r"^error: unknown torchvision model 'resnet19' \(did you mean 'resnet18'"),
    (["--model", "timm:no_such_net"], r"^error: unknown timm model 'no_such_net'"),
    (["--model", "torchvision:resnet18", "split=layer9"], r"^error: torchvision:resnet18 has no module 'layer9'; "
                                                            r"pass split=NAME, .* one of: bn1, relu"),
    (["split=layer3"], r"^error: split applies to torchvision:, timm: and imported networks"),
    (["model=[resnet8,resnet8,resnet8]"], r"^error: model is a list of 3 networks, one per peer, which only the "
                                          r"whole-network methods \(independent, dml, kdcl\) take"),
    (["--method", "dml", "model=[resnet8,resnet8]"], r"^error: model lists 2 networks for peers=3"),
])
def test_bad_configuration(capsys, tmp_path, args, pattern):
    fails(capsys, TRAIN + ["--out", str(tmp_path / "r")] + args, pattern)
    assert not (tmp_path / "r").exists()  # nothing half-made is left behind


def test_missing_and_empty_data_dir(capsys, tmp_path):
    fails(capsys, TRAIN + ["--dataset", "cifar10", "--data-dir", str(tmp_path / "nope")],
          r"^error: data directory .*nope does not exist \(add --download")
    (tmp_path / "empty").mkdir()
    fails(capsys, TRAIN + ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "empty")],
          r"^error: data directory .*empty is empty")


def test_corrupt_image(capsys, folder):
    (folder / "imgs" / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG garbage")
    fails(capsys, TRAIN + ["--dataset", "imagefolder", "--data-dir", str(folder / "imgs")],
          r"^error: cannot read image .*bad\.png")


def test_class_count_mismatch(capsys, folder):
    solid(folder / "imgs" / "val" / "ghost" / "0.png", 1)
    fails(capsys, TRAIN + ["--dataset", "imagefolder", "--data-dir", str(folder / "imgs")],
          r"^error: class mismatch between splits: train/ has 3 classes, val/ has 4.*ghost")


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    fails(capsys, ["train", "--resume", str(tmp_path)], r"^error: .* is not a run folder \(no config.yaml\)")
    fails(capsys, ["eval", str(tmp_path)], r"is not a run folder")


def test_missing_config_file(capsys, tmp_path):
    fails(capsys, TRAIN + ["--config", str(tmp_path / "x.yaml")], r"^error: config file .*x.yaml does not exist")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    fails(capsys, TRAIN + ["--config", str(tmp_path / "bad.yaml")], r"is not valid YAML")
    (tmp_path / "typo.yaml").write_text("method: dkel\nwieght_decay: 0.1\n")
    fails(capsys, TRAIN + ["--config", str(tmp_path / "typo.yaml")],
          r"unknown config key 'wieght_decay' in .*typo.yaml \(did you mean 'weight_decay'\?\)")


def test_non_finite_loss(capsys, tmp_path, exploding):
    line = fails(capsys, TRAIN[:1] + ["--method", "exploding", "--epochs", "2", "--out", str(tmp_path),
                                      "progress=none", "train_subset=200"], r"^stopped: loss became nan")
    assert "state after epoch 1 is kept" in line and (tmp_path / "checkpoints" / "last.pt").exists()


def test_python_m_dkel_is_the_same_program(tmp_path):
    """`python -m dkel` (what torchrun runs) behaves like the console script, errors included."""
    out = subprocess.run([PYTHON, "-m", "dkel", "train", "--model", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown model 'nope'")
    assert "Traceback" not in out.stderr
    listing = subprocess.run([PYTHON, "-m", "dkel", "list"], capture_output=True, text=True, check=True).stdout
    assert "| dkel |" in listing and "| resnet32 |" in listing and "| tinyimagenet |" in listing


def test_train_eval_export(capsys, tmp_path):
    run = tmp_path / "run"
    main(["train", "--method", "pcl", "--epochs", "1", "--out", str(run), "progress=none", "train_subset=400"])
    assert json.loads((run / "results.json").read_text())["method"] == "pcl"
    capsys.readouterr()
    main(["eval", str(run)])
    table = capsys.readouterr().out
    assert "| teacher1 (deploy_acc) |" in table and "| student_ensemble |" in table
    for fmt in ("safetensors", "torchscript", "onnx"):
        main(["export", str(run), "--format", fmt])
        assert "max |difference|" in capsys.readouterr().out
    assert {p.name for p in (run / "export").iterdir()} >= {"deploy.safetensors", "deploy.pt", "deploy.onnx",
                                                         "deploy.onnx.json"}
