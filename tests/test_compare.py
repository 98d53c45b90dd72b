"""`dkel compare` / `dkel table`: aggregation on hand-written run folders, the grid, one tiny real grid."""
import csv
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from dkel import compare
from dkel.cli import main
from dkel.errors import ConfigError, DkelError


def fake_run(root: Path, method: str, seed: int, last: float, best: float, *, variant="default", epochs=3,
             model="resnet32", dataset="cifar100", outputs=None, finished=True, columns=None) -> Path:
    """A run folder as the engine writes it, with the deployed accuracy `last` at the last epoch
    (`columns`: more metrics.csv columns, name -> one value per epoch)."""
    folder = root / dataset / f"{method}-{model}" / f"{variant}-seed{seed}"
    folder.mkdir(parents=True)
    config = {"method": method, "model": model, "dataset": dataset, "seed": seed, "epochs": epochs, "name": None,
              "lr": 0.1, "threads": seed + 1}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    history = [{"epoch": e + 1, "deploy_acc": best if e == 0 else last,
                **{k: v[e] for k, v in (columns or {}).items()}} for e in range(epochs if finished else 1)]
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "deploy_acc", *(columns or {})])
        writer.writeheader()
        writer.writerows(history)
    if finished:
        metrics = {"peer1": last, "peer2": 0.5, "peer_mean": (last + 0.5) / 2, "peer_max": max(last, 0.5),
                   **(outputs or {})}
        results = {"method": method, "mode": None, "model": model, "dataset": dataset, "seed": seed,
                   "epochs": epochs, "deploy_output": "peer_mean", "deploy_acc": last, "best_deploy_acc": best,
                   "best_epoch": 1, "metrics": metrics, "time_constants": {}}
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_aggregation_means_stds_last_and_best(tmp_path):
    for seed, (last, best) in enumerate([(0.70, 0.72), (0.74, 0.75), (0.72, 0.81)]):
        fake_run(tmp_path, "dml", seed, last, best, outputs={"ensemble": last + 0.01})
    fake_run(tmp_path, "dml", 3, 0.0, 0.0, finished=False)  # interrupted after one epoch
    groups = compare.group_runs(compare.find_runs([tmp_path]))
    assert len(groups) == 1
    g = groups[0]
    assert (g.dataset, g.model, g.method, g.variant, g.epochs) == ("cifar100", "resnet32", "dml", "default", 3)
    q = g.quantities()
    assert q["deploy_last"].mean == pytest.approx(72.0)
    assert q["deploy_last"].std == pytest.approx(2.0)  # sample std of 70, 74, 72
    assert q["deploy_best"].mean == pytest.approx(76.0)  # 72, 75, 81: best differs from last
    assert q["deploy_best"].std == pytest.approx(math.sqrt((16 + 1 + 25) / 2))
    assert q["ensemble"].mean == pytest.approx(73.0)
    assert "peer1" not in q and "peer_max" in q  # individual peers are not tabulated, groups are
    assert q["deploy_last"].n == 3 and len(g.runs) == 4
    text = compare.markdown(groups, "t")
    assert "72.00 ± 2.00" in text and "3/4" in text
    assert "unfinished" in text and "dml-resnet32/default-seed3" in text  # reported, not dropped
    assert "peer_max †" in text and "released code's convention" in text and "last epoch" in text
    assert "Warning" not in text  # threads differ between the runs, but that is not the computation


def test_missing_and_failed_planned_runs_are_reported(tmp_path):
    done = fake_run(tmp_path, "kdcl", 0, 0.6, 0.6)
    key = {"method": "kdcl", "model": "resnet32", "dataset": "cifar100", "variant": "default", "epochs": 3}
    runs = [compare.load_run(done, {**key, "seed": 0}),
            compare.load_run(tmp_path / "nowhere-seed1", {**key, "seed": 1}),
            compare.load_run(tmp_path / "nowhere-seed2", {**key, "seed": 2}, failure="exit 2: error: boom")]
    assert [r.status for r in runs] == ["done", "missing", "failed"]
    groups = compare.group_runs(runs)
    assert len(groups) == 1 and groups[0].quantities()["deploy_last"].text() == "60.00 (n=1)"
    text = compare.markdown(groups, "t")
    assert "1/3" in text and "| missing |" in text and "exit 2: error: boom" in text
    compare.write_csv(groups, tmp_path / "table.csv")
    with open(tmp_path / "table.csv") as f:
        rows = {r["quantity"]: r for r in csv.DictReader(f)}
    assert rows["deploy_last"]["n"] == "1" and rows["deploy_last"]["runs"] == "3"
    assert rows["deploy_last"]["values"] == "seed0:60.0000" and rows["deploy_last"]["std"] == ""


def test_table_command_with_paper_numbers(tmp_path, capsys):
    for seed in range(2):
        fake_run(tmp_path / "a", "pcl", seed, 0.74, 0.75)
    fake_run(tmp_path / "b", "independent", 0, 0.70, 0.70)
    main(["table", str(tmp_path / "a"), str(tmp_path / "b" / "cifar100" / "independent-resnet32" / "default-seed0"),
          "--paper", "cifar100", "--out", str(tmp_path / "t")])
    text = capsys.readouterr().out
    # PCL ResNet-32 on CIFAR-100 (SPEC 6.1), a best-epoch number, against the runs' best epoch (75.00)
    assert "| 74.14 | +0.86 | — | — |" in text
    assert "| — | — | — | — |" in text  # no published number for independent training
    assert "best-epoch numbers" in text
    assert (tmp_path / "t" / "table.md").is_file() and (tmp_path / "t" / "curves.png").is_file()
    assert compare.published("cifar10", "vgg16", "dkel") == (95.35, "PCL + the stated gain 0.61")


def test_sweep_values_and_lists():
    assert compare.split_top_level("0.05,0.1,0.5") == ["0.05", "0.1", "0.5"]
    assert compare.split_top_level("[150,225]") == ["[150,225]"]
    assert compare.split_top_level("[1,2],[3]") == ["[1,2]", "[3]"]
    fixed, sweeps = compare.parse_grid_overrides(["beta=0.1,0.5", "milestones=[2,3]", "decay=cos"])
    assert fixed == {"milestones": [2, 3], "decay": "cos"}
    assert sweeps == {"beta": [("0.1", 0.1), ("0.5", 0.5)]}
    with pytest.raises(ConfigError, match="set by the grid"):
        compare.parse_grid_overrides(["seed=1,2"])


def test_plan_method_specific_keys(tmp_path):
    fixed, sweeps = compare.parse_grid_overrides(["beta=0.1,0.5", "train_subset=100"])
    runs = compare.plan(["independent", "dkel"], ["resnet8"], ["digits"], [0, 1], fixed, sweeps, tmp_path)
    folders = sorted(str(p.folder.relative_to(tmp_path)) for p in runs)
    assert folders == ["digits/dkel-resnet8/paper-beta0.1-seed0", "digits/dkel-resnet8/paper-beta0.1-seed1",
                       "digits/dkel-resnet8/paper-beta0.5-seed0", "digits/dkel-resnet8/paper-beta0.5-seed1",
                       "digits/independent-resnet8/default-seed0", "digits/independent-resnet8/default-seed1"]
    indep = [p for p in runs if p.key["method"] == "independent"]
    assert all(p.ignored == ["beta"] and "beta" not in p.values and p.values["train_subset"] == 100 for p in indep)
    assert all(p.action == "train" for p in runs)
    with pytest.raises(ConfigError, match="no method .* has a config key 'betta'"):
        compare.plan(["independent", "dkel"], ["resnet8"], ["digits"], [0], {"betta": 1}, {}, tmp_path)
    with pytest.raises(ConfigError, match="unknown method"):
        compare.plan(["dkell"], ["resnet8"], ["digits"], [0], {}, {}, tmp_path)


def test_existing_folder_with_another_config_is_an_error(tmp_path):
    (p,) = compare.plan(["independent"], ["resnet8"], ["digits"], [0], {"epochs": 2}, {}, tmp_path)
    p.folder.mkdir(parents=True)
    (p.folder / "config.yaml").write_text(yaml.safe_dump({**p.resolved, "epochs": 5, "threads": 7}))
    with pytest.raises(DkelError, match="different configuration .*epochs: saved 5, requested 2"):
        compare.plan(["independent"], ["resnet8"], ["digits"], [0], {"epochs": 2}, {}, tmp_path)
    (p.folder / "config.yaml").write_text(yaml.safe_dump({**p.resolved, "threads": 7}))  # execution keys may differ
    assert compare.plan(["independent"], ["resnet8"], ["digits"], [0], {"epochs": 2}, {}, tmp_path)[0].action == "resume"


def test_plain_train_runs_are_found_by_compare(tmp_path):
    """A run made with `dkel train runs_dir=OUT` (no name) is the run compare would make."""
    (p,) = compare.plan(["dkel"], ["resnet8"], ["digits"], [0], {"epochs": 2}, {}, tmp_path)
    p.folder.mkdir(parents=True)
    (p.folder / "config.yaml").write_text(yaml.safe_dump({**p.resolved, "name": None}))
    (p.folder / "results.json").write_text("{}")
    assert p.folder.name == "paper-seed0"
    assert compare.plan(["dkel"], ["resnet8"], ["digits"], [0], {"epochs": 2}, {}, tmp_path)[0].action == "skip"


def test_compare_end_to_end_skips_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "independent,dkel", "--model", "resnet8", "--dataset", "digits", "--seeds", "1",
            "--epochs", "1", "--out", str(out), "train_subset=200", "threads=1", "beta=0.5,1.0"]
    main(argv)
    first = capsys.readouterr().out
    assert "3 to train" in first and "note: independent has no beta" in first
    table = (out / "table.md").read_text()
    assert "| digits | resnet8 | dkel | paper-beta0.5 |" in table and "| independent | default |" in table
    assert "1/1" in table and "teacher1" in table and (out / "curves.png").is_file()
    results = sorted(out.rglob("results.json"))
    assert len(results) == 3
    stamps = [r.stat().st_mtime_ns for r in results]

    main(argv)  # the same command again: everything is finished
    second = capsys.readouterr().out
    assert "3 finished (skipped), 0 to resume, 0 to train" in second
    assert [r.stat().st_mtime_ns for r in results] == stamps

    os.remove(results[0])  # as if it was interrupted after its last checkpoint
    main(argv)
    third = capsys.readouterr().out
    assert "1 to resume" in third and "(resume)" in third
    assert results[0].is_file()


def test_note_names_an_ignored_key_once(tmp_path, capsys):
    """A key set both in the config file and as a sweep is one key the method lacks, named once."""
    config = tmp_path / "c.yaml"
    config.write_text("method: dkel\nmode: paper\n")
    main(["compare", "--config", str(config), "--methods", "pcl,dkel", "--model", "resnet8", "--dataset", "digits",
          "--seeds", "1", "--out", str(tmp_path / "o"), "mode=paper,reference", "--dry-run"])
    assert "note: pcl has no mode; ignored" in capsys.readouterr().out


def test_paper_column_compares_dkel_in_its_released_convention(tmp_path):
    """DKEL's published numbers are the best teacher peer at the best epoch; dkel's runs are put in
    that convention in their own column, and only that column is compared with the paper."""
    for seed, peaks in enumerate([[0.70, 0.76, 0.75], [0.71, 0.74, 0.78]]):
        fake_run(tmp_path, "dkel", seed, 0.74, 0.75, columns={"test_teacher_max": peaks})
    text = compare.markdown(compare.group_runs(compare.find_runs([tmp_path])), "t", "cifar100")
    # published 74.83 (ResNet-32, 1 init step); released convention: mean of 76 and 78
    assert "| 74.83 * | — | 77.00 ± 1.41 | +2.17 |" in text
