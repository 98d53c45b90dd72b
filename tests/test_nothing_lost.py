"""Nothing a user or an earlier run wrote is lost: run folders, resume, locks, I/O faults, silent
wrong answers (issue 10).  Every fault ends in one line and a non-zero exit."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON
from dkel import files
from dkel.cli import main
from dkel.engine import load_checkpoint
from test_data import solid, write_image_folder

QUICK = ["--method", "independent", "--epochs", "1", "progress=none", "train_subset=200"]


def run_cli(capsys, args):
    """(exit code, stderr lines) of `dkel ARGS`."""
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def fails(capsys, args, pattern, code=2):
    got, err = run_cli(capsys, args)
    assert got == code, (got, err)
    assert err and "Traceback" not in "\n".join(err)
    assert re.search(pattern, err[-1]), err[-1]
    assert len(err[-1]) < 600
    return err[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch DKEL run (copied per test with `copy_run`)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    main(["train", "--method", "dkel", "--epochs", "2", "--out", str(run), "progress=none", "train_subset=200"])
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 1. --overwrite
def test_a_folder_with_a_users_files_is_never_used_or_deleted(capsys, tmp_path):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "thesis.txt").write_text("data")
    for extra in ([], ["--overwrite"]):
        fails(capsys, ["train", *QUICK, "--out", str(work), *extra],
              r"^error: .*mywork is not empty and holds files dkel did not write \(thesis\.txt\)")
        assert (work / "thesis.txt").read_text() == "data" and os.listdir(work) == ["thesis.txt"]


def test_overwrite_never_deletes_the_current_directory_or_its_parents(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    main(["train", *QUICK, "--out", str(run)])
    before = snapshot(run)
    monkeypatch.chdir(run)
    fails(capsys, ["train", *QUICK, "--out", ".", "--overwrite"], r"refusing to overwrite \.: it is the current")
    monkeypatch.chdir(run / "checkpoints")
    fails(capsys, ["train", *QUICK, "--out", "..", "--overwrite"], r"refusing to overwrite \.\.: it is the current")
    assert snapshot(run) == before


def test_overwrite_needs_the_marker_dkel_writes(capsys, tmp_path):
    run = tmp_path / "run"
    main(["train", *QUICK, "--out", str(run)])
    (run / ".dkel-run").unlink()  # a folder of dkel's names that dkel did not create (or an old one)
    fails(capsys, ["train", *QUICK, "--out", str(run), "--overwrite"], r"was not created by this version of dkel")
    assert (run / "checkpoints" / "last.pt").is_file()


def test_overwrite_replaces_a_dkel_run(capsys, tmp_path):
    run = tmp_path / "run"
    main(["train", *QUICK, "--out", str(run)])
    fails(capsys, ["train", *QUICK, "--out", str(run)], r"already exists; continue it with --resume")
    (run / "export").mkdir()
    (run / "export" / "deploy.pt").write_text("old")
    main(["train", *QUICK, "--out", str(run), "--seed", "1", "--overwrite"])
    assert not (run / "export").exists() and json.loads((run / "results.json").read_text())["seed"] == 1


# ----------------------------------------------------------------------------- 2. --resume
def test_resume_that_changes_the_model_is_refused_before_anything_is_written(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run), "--model", "resnet14", "--epochs", "3"],
          r"^error: --resume cannot change what defines run .*\(model: 'resnet8' -> 'resnet14'\)")
    assert snapshot(run) == before
    main(["export", str(run)])  # the folder still works
    main(["train", "--resume", str(run), "--epochs", "3"])
    assert json.loads((run / "results.json").read_text())["epochs"] == 3


def test_resume_cannot_shorten_a_run_or_move_it(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run), "--epochs", "1", "--out", str(tmp_path / "X")],
          r"continues .* where it is; out cannot point elsewhere")
    fails(capsys, ["train", "--resume", str(run), "--epochs", "1"], r"has finished 2 epochs; epochs=1 would shorten")
    fails(capsys, ["train", "--resume", str(run)], r"has already finished all 2 epochs; nothing to resume")
    fails(capsys, ["train", "--resume", str(run), "--overwrite"], r"--resume and --overwrite cannot be combined")
    assert snapshot(run) == before and not (tmp_path / "X").exists()


def test_extending_a_run_is_recorded_not_rewritten(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    config = (run / "config.yaml").read_bytes()
    main(["train", "--resume", str(run), "--epochs", "3", "--threads", "1"])
    assert (run / "config.yaml").read_bytes() == config  # the past is not rewritten
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert [s["event"] for s in sessions] == ["start", "resume"]
    assert sessions[1]["changed"] == {"epochs": [2, 3], "threads": [None, 1]} and sessions[1]["after_epoch"] == 2
    assert json.loads((run / "results.json").read_text())["epochs"] == 3
    log = (run / "train.log").read_text()
    assert "resumed with changes: epochs 2 -> 3" in log


def test_a_checkpoint_of_another_model_is_one_line(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    other = tmp_path / "other"
    main(["train", "--method", "dkel", "--model", "resnet14", "--epochs", "1", "--out", str(other),
          "progress=none", "train_subset=200"])
    (run / "results.json").unlink()
    (run / "checkpoints" / "last.pt").write_bytes((other / "checkpoints" / "last.pt").read_bytes())
    fails(capsys, ["train", "--resume", str(run), "--epochs", "3"], r"last\.pt belongs to another run \(model=")


def test_a_checkpoint_that_does_not_fit_is_one_line(capsys, tmp_path, finished_run):
    """Same config, other weights (e.g. hand-edited): the mismatch is named in one short line."""
    run = copy_run(finished_run, tmp_path / "run")
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    ckpt["method"] = {k: v for k, v in ckpt["method"].items() if not k.startswith("teacher.")}
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    fails(capsys, ["train", "--resume", str(run), "--epochs", "3"], r"last\.pt does not fit this run's modules")
    fails(capsys, ["eval", str(run)], r"last\.pt does not fit this run's modules")


def test_a_missing_checkpoint_is_not_a_silent_restart(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "checkpoints" / "last.pt").unlink()
    fails(capsys, ["train", "--resume", str(run), "--epochs", "3"], r"last\.pt is missing although .* finished epochs")


def test_resume_of_a_run_that_never_finished_an_epoch_says_it_starts_over(capsys, tmp_path):
    run = tmp_path / "run"
    main(["train", *QUICK, "--out", str(run)])
    for name in ("results.json", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
        (run / name).unlink()  # as after a kill during epoch 1
    main(["train", "--resume", str(run)])
    assert "starting it from the beginning" in capsys.readouterr().err
    assert (run / "results.json").is_file()


# ----------------------------------------------------------------------------- 3. locks
def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock, as a running `dkel train` does."""
    code = ("import sys, time; from pathlib import Path; from dkel.run_folder import RunFolder; "
            "lock = RunFolder(Path(sys.argv[1])).lock(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([PYTHON, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_folder_in_use_is_refused_with_the_holders_pid(capsys, tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    holders = [hold_lock(run), hold_lock(fresh)]
    try:
        before = snapshot(run)
        fails(capsys, ["train", "--resume", str(run), "--epochs", "3"],
              rf"run folder .*run is in use by pid {holders[0].pid} on ")
        assert snapshot(run) == before
        fails(capsys, ["train", *QUICK, "--out", str(fresh)], rf"is in use by pid {holders[1].pid}")
        assert os.listdir(fresh) == [".lock"]
    finally:
        for h in holders:
            h.kill()
            h.wait()
    main(["train", "--resume", str(run), "--epochs", "3"])  # the lock died with its process


# ----------------------------------------------------------------------------- 4. I/O faults
def failing_commit(monkeypatch, code: int, when=lambda path: True):
    real = files.commit

    def commit(tmp, path):
        if when(Path(path)):
            raise OSError(code, os.strerror(code))
        real(tmp, path)

    monkeypatch.setattr(files, "commit", commit)


def test_disk_full_while_checkpointing_keeps_the_last_good_one(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    main(["train", *QUICK, "--out", str(run)])
    good = (run / "checkpoints" / "last.pt").read_bytes()
    failing_commit(monkeypatch, errno.ENOSPC, lambda p: p.name == "last.pt")
    fails(capsys, ["train", "--resume", str(run), "--epochs", "2"],
          r"^error: cannot write .*checkpoints/last\.pt: no space left on the device$")
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert not [p for p in run.rglob("*.tmp")]
    assert "error: cannot write" in (run / "train.log").read_text()


def test_read_only_out_is_one_line(capsys, tmp_path, monkeypatch):
    def read_only(path):
        raise files.storage_error(path, OSError(errno.EROFS, "Read-only file system"), "create the folder")

    monkeypatch.setattr(files, "make_dir", read_only)
    fails(capsys, ["train", *QUICK, "--out", str(tmp_path / "ro" / "run")],
          r"^error: cannot create the folder .*ro/run: read-only file system$")


def test_a_full_dataset_cache_falls_back_to_no_cache(caplog, tmp_path, monkeypatch):
    write_image_folder(tmp_path / "imgs")
    failing_commit(monkeypatch, errno.ENOSPC)
    from dkel.data import load_dataset

    data = load_dataset("imagefolder", str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    assert len(data.train_labels) == 9 and "continuing without a dataset cache" in caplog.text
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_export_into_a_folder_and_onto_a_read_only_one(capsys, tmp_path, finished_run, monkeypatch):
    run = copy_run(finished_run, tmp_path / "run")
    out = tmp_path / "exports"
    out.mkdir()
    main(["export", str(run), "--out", str(out) + "/"])
    assert (out / "deploy.safetensors").is_file() and (out / "deploy.safetensors.json").is_file()
    fails(capsys, ["export", str(run), "--out", str(out / "deploy.safetensors")], r"already exists; add --overwrite")
    main(["export", str(run), "--out", str(out / "deploy.safetensors"), "--overwrite"])
    failing_commit(monkeypatch, errno.EROFS)
    for fmt in ("safetensors", "torchscript"):
        fails(capsys, ["export", str(run), "--format", fmt, "--out", str(tmp_path / "ro")],
              r"^error: cannot write .*ro: read-only file system$")
    assert not (tmp_path / "ro").exists()


def test_a_real_full_disk(capsys, tmp_path):
    """A 3 MB tmpfs as the run folder's filesystem (needs permission to mount; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, err = run_cli(capsys, ["train", "--method", "dkel", "--model", "resnet14", "--epochs", "3",
                                     "--out", str(mount / "run"), "progress=none", "train_subset=200"])
        assert code == 2 and re.search(r"^error: cannot write .*: no space left on the device$", err[-1]), err
        assert not list(mount.rglob("*.tmp"))
        last = mount / "run" / "checkpoints" / "last.pt"
        if last.exists():
            load_checkpoint(last)  # whatever was written is whole
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ----------------------------------------------------------------------------- 5. silent wrong answers
def test_changed_classes_are_refused_by_eval_and_resume(capsys, tmp_path):
    write_image_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    main(["train", "--method", "independent", "--epochs", "1", "--dataset", "imagefolder", "--data-dir",
          str(tmp_path / "imgs"), "--out", str(run), "progress=none", "batch_size=4"])
    for split in ("train", "val"):
        solid(tmp_path / "imgs" / split / "fox" / "0.png", 200)
        solid(tmp_path / "imgs" / split / "fox" / "1.png", 210)
    pattern = r"classes differ from the run's.*the run has 3 \(cat, dog, emu\), the data has 4 \(cat, dog, emu, fox\)"
    fails(capsys, ["eval", str(run)], pattern)
    fails(capsys, ["train", "--resume", str(run), "--epochs", "2"], pattern)


def test_changed_images_with_the_same_classes_warn(capsys, tmp_path):
    write_image_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    main(["train", "--method", "independent", "--epochs", "1", "--dataset", "imagefolder", "--data-dir",
          str(tmp_path / "imgs"), "--out", str(run), "progress=none", "batch_size=4"])
    solid(tmp_path / "imgs" / "val" / "cat" / "0.png", 77)
    capsys.readouterr()
    main(["eval", str(run)])
    assert "differs from the data the run trained on" in capsys.readouterr().err


def test_one_class_is_an_error(capsys, tmp_path):
    write_image_folder(tmp_path / "one", classes=("cat",))
    fails(capsys, ["train", *QUICK[:-1], "--dataset", "imagefolder", "--data-dir", str(tmp_path / "one"),
                   "--out", str(tmp_path / "r1")], r"found 1 class \(cat\); a classifier needs at least two")
    assert not (tmp_path / "r1").exists()


def test_an_empty_class_folder_is_named(caplog, tmp_path):
    write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "yak").mkdir()
    from dkel.data import load_dataset

    data = load_dataset("imagefolder", str(tmp_path / "imgs"))
    assert data.classes == ["cat", "dog", "emu"]
    assert re.search(r"class folder .*train/yak holds no images; class 'yak' is left out", caplog.text)


@pytest.fixture
def inflated(monkeypatch):
    """Method `inflated`: `independent` whose reported loss is 100x its value from epoch 2 on (the
    gradient is unchanged), i.e. a loss far above its start that stays finite."""
    from dkel.methods import METHODS
    from dkel.methods.independent import Independent
    from dkel.registry import Entry

    class Inflated(Independent):
        name = "inflated"

        def losses(self, views, labels, epoch):
            out = super().losses(views, labels, epoch)
            if epoch >= 1:
                loss = out.losses["loss"]
                out.losses["loss"] = loss + 99 * loss.detach()
            return out

    monkeypatch.setitem(METHODS._entries, "inflated", Entry("inflated", Inflated, "test"))


def test_divergence_short_of_nan_stops_and_keeps_the_last_good_state(capsys, tmp_path, inflated):
    run = tmp_path / "run"
    line = fails(capsys, ["train", "--method", "inflated", "--epochs", "3", "--out", str(run), "progress=none",
                          "train_subset=200"], r"^stopped: training diverged: every step of epoch 2 had a loss above 10 x",
                 code=3)
    assert "state after epoch 1 is kept" in line
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 0 and not (run / "results.json").exists()
    assert "stopped: training diverged" in (run / "train.log").read_text()
    main(["train", "--method", "inflated", "--epochs", "3", "--out", str(tmp_path / "off"), "progress=none",
          "train_subset=200", "divergence_check=false"])


def test_a_run_that_ends_at_chance_says_so(capsys, tmp_path):
    """lr 5 on digits does not always explode (at 30 epochs the logits shrink towards zero slowly,
    above the collapse check's threshold, and the run ends at chance); a run that ends at chance must
    not pass for a result, whatever led there (here: divergence with its guard switched off)."""
    run = tmp_path / "run"
    code, err = run_cli(capsys, ["train", "--method", "dkel", "--lr", "5", "--epochs", "2", "--out", str(run),
                                 "progress=none", "train_subset=200", "divergence_check=false"])
    results = json.loads((run / "results.json").read_text())
    assert code == 0 and results["deploy_acc"] <= 0.15
    warning = next((line for line in err if "ended at chance" in line), err)
    assert re.search(r"^warning: the deployed network ended at chance level: accuracy 0\.\d+ with 10 classes", warning)
    assert "at chance level" in results["warning"] and "ended at chance level" in (run / "train.log").read_text()
    healthy = tmp_path / "healthy"
    code, err = run_cli(capsys, ["train", "--method", "independent", "--epochs", "2", "--out", str(healthy),
                                 "progress=none"])
    assert code == 0 and not any("ended at chance" in line for line in err)
    assert "warning" not in json.loads((healthy / "results.json").read_text())


# ----------------------------------------------------------------------------- 6. smaller
def test_interrupt_and_sigterm_are_logged_and_said(tmp_path):
    for sig, code, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated by SIGTERM")):
        run = tmp_path / word.split()[0]
        proc = subprocess.Popen([PYTHON, "-m", "dkel", "train", "--method", "independent", "--epochs", "50",
                                 "--out", str(run), "progress=none", "train_subset=400", "threads=1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                # a shell that starts the suite in the background ignores SIGINT, which
                                # the child would inherit: give it the default a terminal gives
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        last = err.strip().splitlines()[-1]
        assert last == f"{word}; continue with: dkel train --resume {run}", last
        assert "Traceback" not in err
        assert re.search(rf"WARNING {word}; the (state after epoch \d+|last finished epoch) is kept in ", (run / "train.log").read_text())


def test_version_threads_and_defaults_in_help(capsys, tmp_path):
    from dkel import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"dkel {__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS training epochs (default: 30)" in text and "--threads THREADS" in text
    main(["train", *QUICK, "--threads", "1", "--out", str(tmp_path / "r")])
    assert "threads: 1" in (tmp_path / "r" / "config.yaml").read_text()


def test_a_method_flag_on_another_method_names_its_owner(capsys, tmp_path):
    fails(capsys, ["train", "--method", "pcl", "--mode", "reference", "--out", str(tmp_path / "r")],
          r"^error: --mode is a setting of dkel; method pcl does not have it$")


def test_peers_are_numbered_from_one():
    from dkel import models
    from dkel.errors import ConfigError

    net = models.create_branched("resnet8", 4, peers=3).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net.deploy(3).eval()(x), net(x).logits[2])
    for bad in (0, 4):
        with pytest.raises(ConfigError, match=r"peer must be an integer in 1\.\.3"):
            net.deploy(bad)


def test_the_sidecar_gives_the_exported_networks_preprocessing(tmp_path, finished_run):
    from dkel.data import load_dataset
    from dkel.deployed import Preprocessing
    from dkel.engine import restore

    run = copy_run(finished_run, tmp_path / "run")
    main(["export", str(run), "--format", "torchscript"])
    exported = torch.jit.load(str(run / "export" / "deploy.pt"))
    prep = Preprocessing.from_sidecar(run / "export" / "deploy.pt")
    data = load_dataset("digits")
    raw = data.test_images[:16]  # uint8 [B, 1, 8, 8], as a user has them
    _, method, _, _ = restore(run)
    normalised = (raw.float() / 255 - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(exported(prep(raw)), method.deploy().eval()(normalised), rtol=1e-4, atol=1e-4)
    assert prep.classes == tuple(data.classes) and len(prep.labels(exported(prep(raw)))) == 16


# ----------------------------------------------------------------------------- safe checkpoints
def test_checkpoints_load_weights_only_and_code_is_never_run(capsys, tmp_path, finished_run):
    torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)
    run = copy_run(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": 2, "epoch": 0, "evil": Payload()}, run / "checkpoints" / "last.pt")
    (run / "results.json").unlink()
    fails(capsys, ["train", "--resume", str(run), "--epochs", "3"], r"refusing to load .*last\.pt: it needs arbitrary")
    fails(capsys, ["eval", str(run)], r"refusing to load")
    assert not marker.exists()


def test_an_interrupt_during_a_checkpoint_write_waits_for_the_file(tmp_path):
    """Ctrl-C arriving inside torch.save broke its zip writer ('unexpected pos'), a traceback instead
    of 'interrupted': the write completes first, then the interrupt is delivered."""
    path = tmp_path / "last.pt"
    state = {"w": torch.arange(100_000, dtype=torch.float32)}

    def save_while_interrupted(f):
        signal.raise_signal(signal.SIGINT)  # as a user's Ctrl-C in the middle of the write
        torch.save(state, f)

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(path, save_while_interrupted)
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
