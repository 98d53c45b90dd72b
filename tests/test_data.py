import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dkel.data import ViewLoader, crop_flip, eval_batches, load_dataset
from dkel.errors import DataError


def slow_crop_flip(images, top, left, flip, pad):
    """Per-sample reference: zero-pad, crop at (top, left), optionally mirror."""
    k, b = top.shape
    _, c, h, w = images.shape
    out = torch.empty(k, b, c, h, w, dtype=images.dtype)
    for v in range(k):
        for i in range(b):
            padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=images.dtype)
            padded[:, pad:pad + h, pad:pad + w] = images[i]
            crop = padded[:, top[v, i]:top[v, i] + h, left[v, i]:left[v, i] + w]
            out[v, i] = crop.flip(-1) if flip[v, i] else crop
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_flip_matches_slow_reference(channels_last):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 10, 12), generator=g, dtype=torch.uint8)
    top, left = torch.randint(0, 9, (2, 3, 6), generator=g)
    flip = torch.randint(0, 2, (3, 6), generator=g)
    got = crop_flip(images, top, left, flip, 4, channels_last)
    assert torch.equal(got, slow_crop_flip(images, top, left, flip, 4))
    if channels_last:
        assert got.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


def digits_loader(**kw):
    data = load_dataset("digits")
    args = dict(batch_size=64, views=3, pad=data.pad, flip=True, mean=data.mean, std=data.std, seed=0)
    args.update(kw)
    return data, ViewLoader(data.train_images, data.train_labels, **args)


def test_views_differ_and_are_normalised():
    data, loader = digits_loader()
    views, labels = next(iter(loader))
    assert views.shape == (3, 64, 1, 8, 8) and views.dtype == torch.float32
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    assert abs(views.mean().item()) < 0.5 and 0.5 < views.std().item() < 1.5


def test_epochs_are_deterministic_and_distinct():
    _, a = digits_loader()
    _, b = digits_loader()
    first = [x for x, _ in a.batches(3)]
    again = [x for x, _ in b.batches(3)]
    other = [x for x, _ in b.batches(4)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_shards_partition_the_global_batch():
    _, whole = digits_loader(batch_size=100)
    _, r0 = digits_loader(batch_size=100, rank=0, world=2)
    _, r1 = digits_loader(batch_size=100, rank=1, world=2)
    for (xw, yw), (x0, y0), (x1, y1) in zip(whole, r0, r1):
        assert sorted(torch.cat([y0, y1]).tolist()) == sorted(yw.tolist())
        assert torch.equal(x0, xw[:, 0::2]) and torch.equal(x1, xw[:, 1::2])
    assert len(whole) == len(r0) == len(r1)


def test_eval_batches_cover_test_set_exactly_once_across_processes():
    data = load_dataset("digits")
    seen = []
    for rank in range(3):
        for _, y in eval_batches(data.test_images, data.test_labels, batch_size=50, mean=data.mean,
                                 std=data.std, rank=rank, world=3):
            seen.append(y)
    assert len(torch.cat(seen)) == len(data.test_labels)


def test_digits_split_is_fixed_and_stratified():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train_images, b.train_images)
    assert len(a.train_labels) == 1437 and len(a.test_labels) == 360
    assert a.test_labels.bincount().min() >= 35 and a.in_channels == 1 and a.image_size == 8


def test_train_subset_is_class_balanced():
    data = load_dataset("digits", train_subset=100)
    assert data.train_labels.bincount().tolist() == [10] * 10
    with pytest.raises(DataError, match="train_subset=5 is smaller than the number of classes"):
        load_dataset("digits", train_subset=5)


# ----------------------------------------------------------------------------- CIFAR pickles
def write_cifar(root, classes, per_batch=6):
    """Small files in the official python-pickle layout; pixel value encodes the label."""
    rng = np.random.default_rng(0)

    def batch(n, label_key):
        labels = rng.integers(0, classes, n)
        data = np.repeat((labels * 2).astype(np.uint8)[:, None], 3072, axis=1)
        return {"data": data, label_key: labels.tolist(), "batch_label": "x"}

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch, "labels"), protocol=2))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(per_batch, "labels"), protocol=2))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(pickle.dumps(batch(5 * per_batch, "fine_labels"), protocol=2))
        (folder / "test").write_bytes(pickle.dumps(batch(per_batch, "fine_labels"), protocol=2))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_official_pickle_layout(tmp_path, name, classes):
    write_cifar(tmp_path, classes)
    data = load_dataset(name, str(tmp_path))
    assert data.train_images.shape == (30, 3, 32, 32) and data.test_images.shape == (6, 3, 32, 32)
    assert data.num_classes == classes
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        assert torch.equal(images[:, 0, 0, 0].long(), labels * 2)
    assert data.mean[0] == pytest.approx(0.5071 if classes == 100 else 0.4914)


# ----------------------------------------------------------------------------- image files
def solid(path, value, size=16, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (value, 255 - value, value // 2) if mode == "RGB" else value
    Image.new(mode, (size, size), color).save(path)


def write_image_folder(root, classes=("cat", "dog", "emu"), test_split="val", n=3, ext="png"):
    for c, name in enumerate(classes):
        for split, count in (("train", n), (test_split, 2)):
            for i in range(count):
                solid(root / split / name / f"{i}.{ext}", 40 * c + 10)


def test_image_folder_labels_follow_sorted_class_names(tmp_path):
    write_image_folder(tmp_path, classes=("zebra", "ant", "moth"))
    data = load_dataset("imagefolder", str(tmp_path))
    assert data.classes == ["ant", "moth", "zebra"]
    expected = {"ant": 50, "moth": 90, "zebra": 10}
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        for img, label in zip(images, labels):
            assert img[0, 0, 0].item() == expected[data.classes[label]]
    assert data.pad == 2 and data.in_channels == 3


def test_image_folder_accepts_test_split_and_resizes(tmp_path):
    write_image_folder(tmp_path, test_split="test")
    solid(tmp_path / "train" / "cat" / "big.png", 10, size=24)
    with pytest.raises(DataError, match="different sizes.*image_size"):
        load_dataset("imagefolder", str(tmp_path))
    data = load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert data.train_images.shape[1:] == (3, 8, 8)


def write_tiny_imagenet_raw(root, wnids=("n02", "n01", "n03")):
    for c, wnid in enumerate(sorted(wnids)):
        for k in range(2):
            solid(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", 60 * c + 20, size=64)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for n, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        solid(root / "val" / "images" / f"val_{n}.JPEG", 60 * sorted(wnids).index(wnid) + 20, size=64)
        lines.append(f"val_{n}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids))


def test_tinyimagenet_raw_release_layout(tmp_path):
    write_tiny_imagenet_raw(tmp_path)
    data = load_dataset("tinyimagenet", str(tmp_path))
    assert data.classes == ["n01", "n02", "n03"]
    assert data.test_labels.tolist() == [2, 0, 1, 0]
    assert data.train_labels.tolist() == [0, 0, 1, 1, 2, 2]
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        assert ((images[:, 0, 32, 32].float() - (60 * labels + 20).float()).abs() <= 3).all()
    assert data.image_size == 64


def test_tinyimagenet_sorted_layout(tmp_path):
    for c, wnid in enumerate(["n01", "n02"]):
        for split in ("train", "val"):
            solid(tmp_path / split / wnid / f"{split}_{c}.JPEG", 100 * c + 20, size=64, mode="L")
    data = load_dataset("tinyimagenet", str(tmp_path))
    assert data.classes == ["n01", "n02"] and data.test_labels.tolist() == [0, 1]
    assert data.in_channels == 3  # grayscale files become RGB


def test_tinyimagenet_annotation_with_unknown_class(tmp_path):
    write_tiny_imagenet_raw(tmp_path)
    ann = tmp_path / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="class mismatch between splits.*n99"):
        load_dataset("tinyimagenet", str(tmp_path))


def test_corrupt_image_is_named(tmp_path):
    write_image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_dataset("imagefolder", str(tmp_path))


def test_class_mismatch_between_splits(tmp_path):
    write_image_folder(tmp_path)
    solid(tmp_path / "val" / "yak" / "0.png", 5)
    with pytest.raises(DataError, match="class mismatch between splits.*yak"):
        load_dataset("imagefolder", str(tmp_path))


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: p, "is empty"),
])
def test_missing_or_empty_data_dir(tmp_path, make, message):
    with pytest.raises(DataError, match=message + r".*--download"):
        load_dataset("cifar10", str(make(tmp_path)))


def test_cache_is_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_image_folder(root)
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", str(root), cache_dir=str(cache))
    files = list(cache.glob("imagefolder-*/meta.json"))
    assert len(files) == 1
    from dkel.data import samples

    def fail(*a, **k):
        raise AssertionError("decoded again although the cache is fresh")

    monkeypatch.setattr(samples, "decode_file", fail)
    again = load_dataset("imagefolder", str(root), cache_dir=str(cache))
    assert torch.equal(first.train_images, again.train_images)
    monkeypatch.undo()
    time.sleep(0.01)
    solid(root / "train" / "cat" / "extra.png", 10)  # the source changed: the cache is stale
    grown = load_dataset("imagefolder", str(root), cache_dir=str(cache))
    assert len(grown.train_labels) == len(first.train_labels) + 1
    files[0].write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    assert len(load_dataset("imagefolder", str(root), cache_dir=str(cache)).train_labels) == len(grown.train_labels)


def test_fashion_mnist_idx_files(tmp_path):
    import gzip

    def idx(data, path, gz):
        header = bytes([0, 0, 8, data.ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
        opener = gzip.open if gz else open
        with opener(path, "wb") as f:
            f.write(header + data.tobytes())

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(12, dtype=np.uint8) % 10
    images = np.repeat(labels[:, None, None] * 20, 28 * 28, 1).reshape(12, 28, 28).astype(np.uint8)
    idx(images, raw / "train-images-idx3-ubyte.gz", True)
    idx(labels, raw / "train-labels-idx1-ubyte.gz", True)
    idx(images[:5], raw / "t10k-images-idx3-ubyte", False)
    idx(labels[:5], raw / "t10k-labels-idx1-ubyte", False)
    data = load_dataset("fashion-mnist", str(tmp_path))
    assert data.train_images.shape == (12, 1, 28, 28) and data.num_classes == 10
    assert torch.equal(data.train_images[:, 0, 0, 0].long(), data.train_labels * 20)
