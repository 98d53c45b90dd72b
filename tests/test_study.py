"""studies/decoupling.py: its variants are what they claim, its paired statistics and collapse counts."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import make_config
from dkel.config import TimeScale
from dkel.methods import METHODS, Setup

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("decoupling", ROOT / "studies" / "decoupling.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def effective(method):
    """What a PCL/DKEL instance actually does, component by component."""
    return {"mode": method.hp.mode, "warmup": method.warmup, "init": method.init_schedule(),
            "decay": method.hp.decay, "dk_rampup": method.hp.dk_rampup, "dk_weight": method.hp.dk_weight,
            "alpha": method.alpha}


# which components each variant changes relative to PCL
CHANGES = {"pcl": set(), "pcl-nowarmup": {"warmup"}, "pcl-nowarmup-init1": {"warmup", "init"},
           "pcl-nowarmup-init10": {"warmup", "init"}, "pcl-decay": {"decay"}, "pcl-unramped": {"dk_rampup"},
           "dkel-paper": {"warmup", "init", "decay", "dk_rampup"},
           "dkel-reference": {"mode", "init", "decay", "dk_rampup"}, "pcl-h20": {"alpha"},
           "dkel-paper-h20": {"warmup", "init", "decay", "dk_rampup", "alpha"}}


def test_each_variant_moves_exactly_its_components_away_from_pcl():
    baseline, variants = study.load_variants()
    assert baseline == "pcl" and set(variants) == set(CHANGES)
    built = {}
    for name, keys in variants.items():
        cfg = make_config(**keys)
        built[name] = effective(METHODS.get(cfg.method)(cfg, Setup("resnet8", 10, 1, 3, 20, 79, TimeScale())))
    for name, values in built.items():
        changed = {k for k in values if values[k] != built["pcl"][k]}
        assert changed == CHANGES[name], name
    assert built["pcl-nowarmup-init10"]["init"] == (10, 0.01) and built["pcl-h20"]["alpha"] == 0.95


def test_paper_scale_config_is_the_spec_recipe_at_the_papers_length():
    cfg = make_config(**yaml.safe_load((ROOT / "configs/studies/cifar100_resnet32_decoupling.yaml").read_text()))
    assert (cfg.dataset, cfg.model, cfg.epochs, cfg.milestones, cfg.batch_size) == ("cifar100", "resnet32", 300,
                                                                                    [150, 225], 128)
    time = TimeScale.for_run(cfg.time_scale, cfg.epochs, 391, 300)
    assert time.factor == 1.0 and time.ema_alpha(0.999) == 0.999


def test_t_interval_by_hand():
    mean, low, high = study.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) * sd 1 / sqrt(3)
    assert (mean, low, high) == (2.0, pytest.approx(2 - half), pytest.approx(2 + half))


def fake(root, variant, seed, acc=None, student=None, log="", logit_norm=5.0):
    folder = root / "cifar10" / "dkel-resnet8" / f"{variant}-seed{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(f"epoch,deploy_acc,student_logit_norm\n2,{acc or 0.1},{logit_norm}\n")
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": "dkel", "model": "resnet8", "dataset": "cifar10",
                                                        "seed": seed, "epochs": 2, "name": variant}))
    (folder / "train.log").write_text(log)
    if acc is not None:
        (folder / "results.json").write_text(json.dumps({
            "method": "dkel", "model": "resnet8", "dataset": "cifar10", "seed": seed, "epochs": 2,
            "deploy_acc": acc, "metrics": {"student_mean": student}, "time_constants": {"ema_horizon_steps": 100}}))


def test_paired_rows_pair_by_seed_and_count_collapses(tmp_path):
    for seed, (a, s) in enumerate([(0.70, 0.69), (0.72, 0.70), (0.71, 0.71)]):
        fake(tmp_path, "pcl", seed, a, s)
    fake(tmp_path, "dkel-paper", 0, 0.71, 0.70)
    fake(tmp_path, "dkel-paper", 1, 0.74, 0.71)
    fake(tmp_path, "dkel-paper", 2, log="... stopped: training collapsed (mean logit norm 0.01) at epoch 2")
    fake(tmp_path, "dkel-paper", 3, 0.10, 0.10, logit_norm=0.01)  # collapsed, no pcl seed 3 to pair with
    fake(tmp_path, "dkel-paper", 4, 0.10, 0.10)  # at chance, but its logits did not shrink
    records, _ = study.gather([tmp_path], {"pcl": {}, "dkel-paper": {}}, num_classes=10)
    rows = {r["variant"]: r for r in study.paired_rows(records, "pcl", ["pcl", "dkel-paper"])}
    paper = rows["dkel-paper"]
    assert (paper["runs"], paper["finished"], paper["collapsed"]) == (5, 4, 2)
    assert paper["deploy_acc_pairs"] == 2 and paper["deploy_acc_diff"] == pytest.approx(1.5)  # +1 and +2 points
    half = 12.706204736174696 * math.sqrt(0.5) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
    assert paper["deploy_acc_low"] == pytest.approx(1.5 - half) and paper["deploy_acc_high"] == pytest.approx(1.5 + half)
    assert paper["student_mean_diff"] == pytest.approx(1.0)  # +1 and +1
    assert math.isnan(rows["pcl"]["deploy_acc_diff"]) and rows["pcl"]["collapsed"] == 0
    text = study.markdown(list(rows.values()), "pcl")
    assert "| dkel-paper | 5 (4) | 2 | 100 |" in text and "+1.50 [" in text and "n=2" in text


def test_compare_commands_name_each_variant(tmp_path):
    commands = study.compare_commands(Path("base.yaml"), 8, tmp_path, 2, ["epochs=2"])
    assert len(commands) == len(CHANGES)
    pcl = next(c for c in commands if "name=pcl-nowarmup-init10" in c)
    assert pcl[3:5] == ["compare", "--config"] and "--methods" in pcl and "dkel" in pcl
    assert {"init_steps=10", "ema_warmup=false", "dk_rampup=true", "decay=none", "epochs=2"} <= set(pcl)


def test_run_can_take_some_variants_first(tmp_path):
    """The study takes more hours than one session: the decisive variants go first, the rest later."""
    commands = study.compare_commands(Path("base.yaml"), 4, tmp_path, 2, [], variants=["dkel-paper", "pcl"])
    assert [next(a for a in c if a.startswith("name=")) for c in commands] == ["name=dkel-paper", "name=pcl"]
    later = study.compare_commands(Path("base.yaml"), 4, tmp_path, 2, [], variants=["pcl"], first_seed=4)[0]
    assert later[later.index("--seeds") + 1] == "4" and later[later.index("--first-seed") + 1] == "4"
    with pytest.raises(SystemExit, match="unknown variant 'dkel-papr'.*dkel-paper"):
        study.compare_commands(Path("base.yaml"), 4, tmp_path, 2, [], variants=["dkel-papr"])


def test_a_study_grows_from_its_runs_csv_when_the_early_folders_are_gone(tmp_path):
    """Run folders do not outlive a machine: runs.csv keeps each run's numbers, and a later analyze
    of it plus new folders gives the table all folders would (a new folder replaces its row)."""
    early, late = tmp_path / "early", tmp_path / "late"
    for seed, (a, b) in enumerate([(0.70, 0.71), (0.72, 0.75)]):
        fake(early, "pcl", seed, a, a)
        fake(early, "dkel-paper", seed, b, b)
    fake(early, "dkel-paper", 2, log="... stopped: training collapsed")
    for seed, (a, b) in [(2, (0.69, 0.70)), (3, (0.71, 0.70))]:
        fake(late, "pcl", seed, a, a)
        if seed == 3:
            fake(late, "dkel-paper", seed, b, b)
    every = study.analyze([early, late], tmp_path / "every", 10)
    study.analyze([early], tmp_path / "first", 10)
    assert (tmp_path / "first" / "runs.csv").read_text().count("dkel-paper,") == 3
    fake(late, "dkel-paper", 2, 0.70, 0.70)  # the collapsed seed, run again
    grown = study.analyze([tmp_path / "first" / "runs.csv", late], tmp_path / "grown", 10)
    rows = {r["variant"]: r for r in study.paired_rows(study.read_records(tmp_path / "grown" / "runs.csv"),
                                                       "pcl", ["pcl", "dkel-paper"])}
    assert (rows["dkel-paper"]["runs"], rows["dkel-paper"]["collapsed"], rows["dkel-paper"]["deploy_acc_pairs"]) == (4, 0, 4)
    assert rows["dkel-paper"]["deploy_acc_diff"] == pytest.approx((1 + 3 + 1 - 1) / 4)
    assert "| dkel-paper | 4 (3) | 1 |" in every and "| dkel-paper | 4 (4) | 0 |" in grown
    with pytest.raises(SystemExit, match="not a runs.csv"):
        study.analyze([tmp_path / "grown" / "paired.csv"], tmp_path / "bad", 10)


def test_pooling_two_tables_over_disjoint_seeds_is_the_table_of_all_pairs(tmp_path):
    pcl = [0.70, 0.72, 0.71, 0.69, 0.73, 0.70, 0.68]
    paper = [0.71, 0.74, 0.70, 0.72, 0.73, 0.74, 0.70]
    tables = []
    for name, seeds in (("all", range(7)), ("first", range(4)), ("second", range(4, 7))):
        for s in seeds:
            fake(tmp_path / name, "pcl", s, pcl[s], pcl[s])
            fake(tmp_path / name, "dkel-paper", s, paper[s], paper[s] - 0.01)
        study.analyze([tmp_path / name], tmp_path / name / "table", 10)
        tables.append(study.read_paired(tmp_path / name / "table" / "paired.csv"))
    every, first, second = tables
    second[0]["runs"] = 99  # the baseline row is the first table's
    pooled = {r["variant"]: r for r in study.pool(first, second, "pcl")}
    for row in every:
        got = pooled[row["variant"]]
        assert got["runs"] == (row["runs"] if row["variant"] != "pcl" else 4)
        for key, value in row.items():
            if key.endswith(("_diff", "_low", "_high")) or (key.endswith("_mean") and row["variant"] != "pcl"):
                assert got[key] == pytest.approx(value, nan_ok=True), (row["variant"], key)
    one = study.pool(first, [dict(second[1], deploy_acc_pairs=1, deploy_acc_diff=2.0)], "pcl")[1]
    assert one["deploy_acc_pairs"] == 5  # a single pair adds its value and no spread of its own
