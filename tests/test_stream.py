"""Data backends: the stream backend, the imagenet recipe, ImageNet layouts, tar shards, user Datasets."""
import io
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_config
from dkel.data import load_dataset, sources
from dkel.data.backend import open_backend
from dkel.data.recipes import Recipe, resized_crop_boxes, uniforms
from dkel.engine import load_checkpoint, train
from dkel.errors import DataError

CLASSES = ("ant", "bee", "cat")


def picture(h, w, value):
    """A smooth RGB image whose colour encodes `value` and whose gradient shows crops and flips."""
    y, x = np.mgrid[0:h, 0:w]
    r = np.full((h, w), value, np.uint8)
    g = (255 * x / max(1, w - 1)).astype(np.uint8)
    b = (255 * y / max(1, h - 1)).astype(np.uint8)
    return Image.fromarray(np.stack([r, g, b], -1))


def write_folder(root, n_train=6, n_val=2, sizes=((40, 30), (30, 48), (36, 36)), ext="png"):
    for c, name in enumerate(CLASSES):
        for split, count in (("train", n_train), ("val", n_val)):
            for i in range(count):
                h, w = sizes[(i + c) % len(sizes)]
                path = root / split / name / f"{i}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                picture(h, w, 60 * c + 20).save(path)
    return root


def make(root, **over):
    rank, world, views = over.pop("rank", 0), over.pop("world", 1), over.pop("views", 3)
    values = dict(dataset="imagefolder", data_dir=str(root), data_backend="stream", recipe="imagenet",
                  image_size=16, batch_size=8, num_workers=0, seed=3)
    values.update(over)
    return open_backend(make_config(**values), views=views, device=torch.device("cpu"), rank=rank, world=world)


def collect(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


# ----------------------------------------------------------------------------- the per-view function
def test_view_parameters_are_a_pure_function_of_seed_epoch_index_view():
    u = uniforms(7, 2, np.arange(6)[:, None], np.arange(3), 5)
    assert u.shape == (6, 3, 5) and 0 <= u.min() and u.max() < 1
    assert np.array_equal(uniforms(7, 2, 4, 1, 5), u[4, 1])  # alone, the same numbers
    for other in (uniforms(8, 2, 4, 1, 5), uniforms(7, 3, 4, 1, 5), uniforms(7, 2, 5, 1, 5), uniforms(7, 2, 4, 2, 5)):
        assert not np.allclose(other, u[4, 1])
    assert not np.allclose(uniforms(7, -1, 4, 1, 5), uniforms(7, 1, 4, 1, 5))


def test_resized_crop_boxes_match_torchvision_statistics():
    top, left, h, w = resized_crop_boxes(uniforms(0, 0, np.arange(20000), 0, 41), 375, 500)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    area = h * w / (375 * 500)
    assert 0.08 * 0.95 < area.min() and area.max() <= 1.0
    assert abs(area.mean() - 0.435) < 0.01  # torchvision's RandomResizedCrop: 0.435 on 500x375
    ratio = w / h
    assert 0.7 < ratio.min() and ratio.max() < 1.4


def test_recipes_keep_the_aspect_ratio_of_non_square_images():
    wide = torch.from_numpy(np.asarray(picture(20, 40, 100))).permute(2, 0, 1).contiguous()
    stored = Recipe("cifar", 16).fit(wide)
    assert stored.shape == (3, 16, 16)
    # a squashed image would still hold both ends of the horizontal gradient; a centre crop does not
    assert stored[1, :, 0].float().mean() > 40 and stored[1, :, -1].float().mean() < 215
    evaluated = Recipe("imagenet", 16).eval_view(wide)
    assert evaluated.shape == (3, 16, 16) and evaluated[1, :, 0].float().mean() > 40


# ----------------------------------------------------------------------------- the stream backend
def test_stream_batches_are_identical_for_0_and_2_workers(tmp_path):
    root = write_folder(tmp_path)
    one, two = make(root, num_workers=0), make(root, num_workers=2)
    try:
        for epoch in (0, 1):
            a, b = collect(one.train_batches(epoch)), collect(two.train_batches(epoch))
            assert len(a) == len(b) == one.steps() == 3 and [len(y) for _, y in a] == [8, 8, 2]
            for (xa, ya), (xb, yb) in zip(a, b):
                assert xa.shape == (3, len(ya), 3, 16, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
        first = collect(one.train_batches(0))
        assert not torch.equal(first[0][0], collect(one.train_batches(1))[0][0])
        assert not torch.equal(first[0][0][0], first[0][0][1])  # the K views differ
        ea, eb = collect(one.eval_batches(4)), collect(two.eval_batches(4))
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(ea, eb))
    finally:
        two.close()


def test_stream_shards_are_disjoint_covering_and_evaluation_is_exact(tmp_path):
    root = write_folder(tmp_path, n_train=5, n_val=3)
    whole = make(root, batch_size=6)
    ranks = [make(root, batch_size=6, rank=r, world=2) for r in range(2)]
    # 15 images: the last batch of 3 is kept by one process, dropped by two (< 2 per process)
    assert whole.steps() == 3 and ranks[0].steps() == ranks[1].steps() == 2
    for (xw, yw), (x0, y0), (x1, y1) in zip(whole.train_batches(4), *(r.train_batches(4) for r in ranks)):
        assert torch.equal(x0, xw[:, 0::2]) and torch.equal(x1, xw[:, 1::2])
        assert torch.equal(torch.cat([y0, y1]).sort().values, yw.sort().values)
    seen = [y for r in ranks for _, y in r.eval_batches(2)]
    assert len(torch.cat(seen)) == whole.test_size == 9  # each test image once, none padded
    assert torch.cat(seen).bincount().tolist() == [3, 3, 3]


def test_stream_and_resident_make_the_same_imagenet_crops(tmp_path):
    """One parameter function, two executions: per sample in workers, batched roi_align on the device."""
    root = write_folder(tmp_path, sizes=((18, 18),))  # square at the stored size: both see the same pixels
    stream = make(root, image_size=16, views=2)
    resident = make(root, image_size=16, views=2, data_backend="resident")
    assert resident.kind == "resident" and stream.kind == "stream"
    assert stream.classes == resident.classes
    for (xs, ys), (xr, yr) in zip(stream.train_batches(2), resident.train_batches(2)):
        assert torch.equal(ys, yr)
        assert (xs - xr).abs().mean() < 0.05  # interpolation differs slightly; a wrong box or flip does not
    for (xs, _), (xr, _) in zip(stream.eval_batches(5), resident.eval_batches(5)):
        assert torch.allclose(xs, xr, atol=1e-5)


def test_bad_image_stops_with_its_name_or_is_skipped(tmp_path, caplog):
    root = write_folder(tmp_path)
    bad = root / "train" / "bee" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*broken.png.*on_bad_image=skip"):
        for _ in make(root).train_batches(0):
            pass
    skipping = make(root, on_bad_image="skip", batch_size=19)
    with caplog.at_level(logging.WARNING, logger="dkel"):
        sizes = [len(y) for _, y in skipping.train_batches(0)]
    assert sizes == [18] and len(skipping.skipped) == 1 and "broken.png" in skipping.skipped[0]
    assert "broken.png" in caplog.text
    with pytest.raises(DataError, match="broken.png"):
        load_dataset("imagefolder", str(root), image_size=16)
    data = load_dataset("imagefolder", str(root), image_size=16, on_bad_image="skip")
    assert len(data.train_labels) == 18 and "broken.png" in data.skipped[0]


def test_auto_logs_its_estimate_and_streams_what_does_not_fit(tmp_path, monkeypatch, caplog):
    from dkel.data import backend as backend_module

    root = write_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="dkel"):
        assert make(root, data_backend="auto").kind == "resident"
        monkeypatch.setattr(backend_module, "resident_budget", lambda device: (1000, "a test budget"))
        assert make(root, data_backend="auto").kind == "stream"
    assert "data_backend=auto: the decoded dataset is about 0.00 GB (24 images)" in caplog.text
    assert "a test budget) -> stream" in caplog.text


def test_resident_cache_is_written_without_stacking_and_memory_mapped(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data")

    def no_stack(*a, **k):
        raise AssertionError("np.stack of the whole dataset")

    monkeypatch.setattr(np, "stack", no_stack)
    first = load_dataset("imagefolder", str(root), image_size=16, cache_dir=str(tmp_path / "cache"))
    monkeypatch.undo()
    again = load_dataset("imagefolder", str(root), image_size=16, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(first.train_images, again.train_images) and first.train_images.shape == (18, 3, 16, 16)
    raw = next((tmp_path / "cache").glob("imagefolder-*/train_images.u8"))
    assert raw.stat().st_size == first.train_images.numel()
    # mapped, not copied: the file's bytes show through the tensor
    with open(raw, "r+b") as f:
        f.write(b"\x07")
    assert load_dataset("imagefolder", str(root), image_size=16,
                        cache_dir=str(tmp_path / "cache")).train_images[0, 0, 0, 0].item() == 7


# ----------------------------------------------------------------------------- ImageNet layouts
def imagenet_root(tmp_path, val):
    root = tmp_path / "imagenet"
    wnids = ["n02", "n01", "n03"]
    for c, wnid in enumerate(sorted(wnids)):
        for k in range(2):
            path = root / "train" / wnid / f"{wnid}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture(20, 24, 60 * c + 20).save(path)
    labels = ["n03", "n01", "n02", "n01"]
    (root / "val").mkdir(parents=True)
    for n, wnid in enumerate(labels, 1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        path = root / "val" / wnid / name if val == "folders" else root / "val" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        picture(24, 20, 60 * sorted(wnids).index(wnid) + 20).save(path)
    if val == "loc":
        rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 3 4 {w} 5 6 7 8" for n, w in enumerate(labels, 1)]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")
    if val == "devkit":
        from scipy.io import savemat

        ids = {"n03": 1, "n01": 2, "n02": 3}  # the devkit's ids are not in wnid order
        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        synsets = np.array([(ids[w], w, w, 0) for w in ids] + [(1001, "n99", "a parent", 3)], dtype=dtype)
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        savemat(data / "meta.mat", {"synsets": synsets})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(str(ids[w]) for w in labels) + "\n")
    return root


@pytest.mark.parametrize("val", ["folders", "loc", "devkit"])
def test_imagenet_val_layouts(tmp_path, val):
    root = imagenet_root(tmp_path, val)
    listing = sources.list_imagenet(root)
    assert listing.classes == ["n01", "n02", "n03"]
    # flat: in file-name order (ILSVRC2012_val_00000001 .. 4); folders: class by class
    assert listing.test.labels.tolist() == ([0, 0, 1, 2] if val == "folders" else [2, 0, 1, 0])
    data = load_dataset("imagenet", str(root), image_size=16)
    assert data.recipe.name == "imagenet" and data.train_images.shape == (6, 3, 18, 18)
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        assert ((images[:, 0].float().mean((1, 2)) - (60 * labels + 20).float()).abs() < 3).all()


def test_imagenet_flat_val_without_labels_is_a_clear_error(tmp_path):
    root = imagenet_root(tmp_path, "flat")
    with pytest.raises(DataError, match="no class folders, and no LOC_val_solution.csv or ILSVRC2012_devkit"):
        sources.list_imagenet(root)


# ----------------------------------------------------------------------------- tar shards, user Datasets
def write_shards(root, per_shard=5):
    for split, count in (("train", 12), ("val", 6)):
        (root / split).mkdir(parents=True)
        for s in range(0, count, per_shard):
            with tarfile.open(root / split / f"{split}-{s // per_shard:04d}.tar", "w") as tar:
                for i in range(s, min(count, s + per_shard)):
                    label = i % 3
                    buf = io.BytesIO()
                    picture(20, 28, 60 * label + 20).save(buf, format="JPEG", quality=95)
                    for name, data in ((f"{i:05d}.jpg", buf.getvalue()), (f"{i:05d}.cls", str(label).encode())):
                        info = tarfile.TarInfo(f"{split}/{name}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def test_webdataset_shards_on_both_backends(tmp_path):
    root = write_shards(tmp_path / "shards")
    stream = make(root, dataset="webdataset", batch_size=4)
    resident = make(root, dataset="webdataset", batch_size=4, data_backend="resident")
    assert stream.classes == list(CLASSES) and stream.train_size == 12 and stream.test_size == 6
    for (xs, ys), (xr, yr) in zip(stream.train_batches(0), resident.train_batches(0)):
        assert torch.equal(ys, yr)
    for x, y in stream.eval_batches(6):  # the label travels with its image
        assert ((x[:, 0].mean((1, 2)) * stream.std[0] + stream.mean[0]) * 255 - (60 * y + 20)).abs().max() < 4


class PairDataset(torch.utils.data.Dataset):
    """A user's Dataset mixing the three accepted image types."""

    classes = list(CLASSES)

    def __init__(self, n, size=(20, 26)):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        label = i % 3
        image = picture(*self.size, 60 * label + 20)
        kind = i % 3
        if kind == 1:
            return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255, label
        if kind == 2:
            return np.asarray(image), torch.tensor(label)
        return image, label


def test_user_datasets_on_both_backends(tmp_path):
    from dkel.data import register_user_dataset

    pair = (PairDataset(12, (18, 18)), PairDataset(6))  # square train images: both backends crop the same
    register_user_dataset("python:mine", lambda root: pair, "test", replace=True)
    cfg = make_config(dataset="python:mine", data_backend="stream", recipe="imagenet", image_size=16,
                      batch_size=6, num_workers=0)
    stream = open_backend(cfg, views=2, device=torch.device("cpu"))
    cfg.data_backend = "resident"
    resident = open_backend(cfg, views=2, device=torch.device("cpu"))
    assert stream.classes == resident.classes == list(CLASSES)
    for (xs, ys), (xr, yr) in zip(stream.train_batches(0), resident.train_batches(0)):
        assert torch.equal(ys, yr) and (xs - xr).abs().mean() < 0.05
    assert sum(len(y) for _, y in stream.eval_batches(4)) == 6


# ----------------------------------------------------------------------------- training through the stream
def run(tmp_path, name, **over):
    values = dict(method="dkel", model="resnet8", dataset="imagefolder", data_dir=str(tmp_path / "data"),
                  data_backend="stream", image_size=16, batch_size=6, epochs=2, num_workers=0, threads=1,
                  out=str(tmp_path / name), eval_batch_size=5,
                  # nothing may depend on the planned length, so that a 1-epoch run is the first half of a 2-epoch one
                  schedule="multistep", milestones=[1], time_scale=1.0)
    values.update(over)
    return make_config(**values)


def test_dkel_trains_through_the_stream_and_resumes_exactly(tmp_path):
    write_folder(tmp_path / "data", sizes=((20, 30), (30, 22)))
    results = train(run(tmp_path, "whole"))
    assert results["epochs"] == 2 and 0 <= results["deploy_acc"] <= 1
    assert "data_backend: stream" in (tmp_path / "whole" / "config.yaml").read_text()
    train(run(tmp_path, "part", epochs=1))
    train(run(tmp_path, "part"), resume=tmp_path / "part")
    a, b = (load_checkpoint(tmp_path / n / "checkpoints" / "last.pt") for n in ("whole", "part"))
    assert a["epoch"] == b["epoch"] == 1
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key
    drop = ("epoch_time_s", "img_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a["history"]] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b["history"]]
