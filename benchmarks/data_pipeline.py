"""Views per second of dkel's data backends against torchvision transforms through a DataLoader
(the usual pipeline, as in the released DKEL code), in one run.

Resident (default): K augmented views (random crop 32 with 4 px zero padding, horizontal flip,
normalisation) of every image of CIFAR-sized uint8 data.

    python benchmarks/data_pipeline.py [--views 3] [--batch 128] [--batches 40] [--workers 0,2]

Stream (--stream DIR): the imagenet recipe (RandomResizedCrop 224, flip, normalisation; K views per
image) read from a folder of JPEGs (generated with --make N at 500x375 if DIR does not exist), by
dkel's stream backend and by torchvision ImageFolder + DataLoader with the same workers, rounds
interleaved; then the two decoders (PIL, torchvision.io) on the same files.

    python benchmarks/data_pipeline.py --stream /tmp/in10k --make 10000 --workers 2 --batch 64

Memory (--rss DIR [DIR ...]): peak memory (PSS summed over the process and its loader workers,
sampled every 0.2 s, and the main process's peak RSS) of a 1-epoch `dkel train` with the stream
backend on each folder.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dkel.data import ViewLoader

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class MultiViewImages(Dataset):
    """PIL images through torchvision transforms, K times per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, views: int):
        self.images, self.labels, self.views = images, labels, views
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return torch.stack([self.transform(img) for _ in range(self.views)]), int(self.labels[i])


def rate(batches, count: int, per_batch: int, rounds: int = 3) -> float:
    it = iter(batches)
    next(it)  # start-up (workers, first epoch draw) is not counted
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(count):
            next(it)
        rates.append(count * per_batch / (time.perf_counter() - t0))
    return statistics.median(rates)


# ----------------------------------------------------------------------------- stream
def _write_image(args):
    path, seed = args
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    noisy = np.asarray(base).astype(np.int16) + rng.integers(-20, 21, (375, 500, 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=85)


def make_folder(root: Path, n_train: int, n_val: int = 500, classes: int = 10, reuse: Path | None = None) -> None:
    """An ImageFolder of 500x375 JPEGs (train/ and val/, `classes` folders); files of `reuse` are hard-linked."""
    from multiprocessing import Pool

    jobs = []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            path = root / split / f"c{i % classes:03d}" / f"{i:07d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            source = reuse / split / path.parent.name / path.name if reuse else None
            if source is not None and source.exists():
                os.link(source, path)
            else:
                jobs.append((path, i + (10**7 if split == "val" else 0)))
    with Pool(2) as pool:
        pool.map(_write_image, jobs, chunksize=64)


class TorchvisionViews:
    """torchvision's ImageNet training transform, K times per image."""

    def __init__(self, views: int):
        self.views = views
        self.transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __call__(self, img):
        return torch.stack([self.transform(img) for _ in range(self.views)])


def stream_rates(a) -> None:
    from torchvision.datasets import ImageFolder

    from dkel.config import resolve
    from dkel.data.backend import open_backend
    from dkel.methods import method_configs

    root = Path(a.stream)
    if not root.exists():
        make_folder(root, a.make)
    workers = int(a.workers.split(",")[-1])
    cfg = resolve([("benchmark", {"dataset": "imagenet", "data_dir": str(root), "data_backend": "stream",
                                  "batch_size": a.batch, "num_workers": workers, "progress": "none"})],
                  method_configs())
    ours = open_backend(cfg, views=a.views, device=torch.device("cpu"), channels_last=True)
    raw = open_backend(cfg, views=a.views, device=torch.device("cpu"), channels_last=True)  # its own workers
    tv = DataLoader(ImageFolder(str(root / "train"), transform=TorchvisionViews(a.views)), batch_size=a.batch,
                    shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    per_batch = a.batch * a.views
    epoch = [0]

    def our_batches():
        while True:
            yield from ours.train_batches(epoch[0])
            epoch[0] += 1

    def our_uint8_batches():
        # what the workers deliver to the device, before the normalisation that the device does
        # (on a GPU, a negligible kernel; here, the main process's CPU time)
        while True:
            yield from raw._pass(raw._train_plan(epoch[0], 0, 1), normalize=False)
            epoch[0] += 1

    def their_batches():
        while True:
            yield from tv

    streams = {"dkel stream backend, normalised on this CPU": our_batches(),
               "dkel stream backend, uint8 views as delivered to the device": our_uint8_batches(),
               "torchvision ImageFolder + DataLoader": their_batches()}
    for it in streams.values():
        next(it)  # start-up (workers, first batches) is not counted
    rates: dict[str, list[float]] = {k: [] for k in streams}
    for _ in range(a.rounds):
        for name, it in streams.items():
            t0 = time.perf_counter()
            for _ in range(a.batches):
                next(it)
            rates[name].append(a.batches * per_batch / (time.perf_counter() - t0))
    n = len(ours.source.train)
    print(f"| pipeline ({n:,} JPEGs 500x375, {a.views} views of 224, batch {a.batch}, {workers} workers) "
          f"| views/s (median of {a.rounds} rounds) | range | vs torchvision |")
    print("|---|---|---|---|")
    ref = statistics.median(rates["torchvision ImageFolder + DataLoader"])
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):,.0f} | {min(r):,.0f}-{max(r):,.0f} | {statistics.median(r) / ref:.2f} |")
    ours.close()
    raw.close()
    decoders(sorted((root / "train").rglob("*.jpg"))[:200])


def decoders(paths) -> None:
    """Decode one image and make 3 crops resized to 224, in one process, PIL against torchvision.io."""
    import torchvision.transforms.v2.functional as TF

    from dkel.data.sources import decode_file

    def with_pil(p):
        with Image.open(p) as img:
            img = img.convert("RGB")
            return [img.resize((224, 224), Image.BILINEAR, box=(50, 30, 350, 330)) for _ in range(3)]

    def with_torchvision(p):
        x = decode_file(p)
        return [TF.resize(x[:, 30:330, 50:350], [224, 224], antialias=True) for _ in range(3)]

    times = {"PIL decode + 3 PIL resizes": [], "torchvision.io decode + 3 tensor resizes (dkel)": []}
    torch.set_num_threads(1)
    for _ in range(3):
        for (name, fn) in zip(times, (with_pil, with_torchvision)):
            t0 = time.perf_counter()
            for p in paths:
                fn(p)
            times[name].append((time.perf_counter() - t0) / len(paths) * 1e3)
    print(f"\n| decoding one 500x375 JPEG + 3 crops to 224, one thread | ms/image (median of 3 x {len(paths)}) |")
    print("|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} |")


# ----------------------------------------------------------------------------- memory
def tree_pss(pid: int) -> int:
    """PSS in bytes of a process and all its descendants (shared pages counted once overall)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            continue
    return total


def peak_memory(a) -> None:
    print("| training images | peak PSS, process + workers (MiB) | peak RSS, main process (MiB) | epoch (s) |")
    print("|---|---|---|---|")
    for folder in a.rss:
        out = Path(f"/tmp/dkel-rss-{os.getpid()}-{Path(folder).name}")
        cmd = [sys.executable, "-c",
               "import resource, sys, runpy; sys.argv = ['dkel'] + sys.argv[1:];"
               "from dkel.cli import main\ntry: main()\nfinally: print('MAXRSS', resource.getrusage("
               "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)",
               "train", "--method", "dkel", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir", folder,
               "--epochs", "1", "--batch-size", "256", "--out", str(out), "--overwrite", "data_backend=stream",
               "recipe=imagenet", "image_size=32", f"num_workers={a.workers.split(',')[-1]}", "threads=1",
               "progress=none"]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        peak = 0
        t0 = time.perf_counter()
        while proc.poll() is None:
            peak = max(peak, tree_pss(proc.pid))
            time.sleep(0.2)
        err = proc.stderr.read()
        if proc.returncode:
            raise SystemExit(err[-2000:])
        rss = int(err.split("MAXRSS")[-1].split()[0]) / 1024
        n = sum(1 for _ in (Path(folder) / "train").rglob("*.jpg"))
        print(f"| {n:,} | {peak / 2**20:,.0f} | {rss:,.0f} | {time.perf_counter() - t0:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=40, help="batches per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (stream)")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stream", metavar="DIR", help="measure the stream backend on this ImageFolder of JPEGs")
    p.add_argument("--make", type=int, default=10_000, help="training images to generate if --stream DIR is missing")
    p.add_argument("--make-like", nargs=2, metavar=("DIR", "N"), help="generate DIR with N training images, "
                   "hard-linking those of --stream DIR, and exit")
    p.add_argument("--rss", nargs="+", metavar="DIR", help="peak memory of a 1-epoch stream training on each folder")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.make_like:
        make_folder(Path(a.make_like[0]), int(a.make_like[1]), reuse=Path(a.stream) if a.stream else None)
        return
    if a.rss:
        return peak_memory(a)
    if a.stream:
        return stream_rates(a)
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
    labels = g.integers(0, 10, 50_000)
    per_batch = a.batch * a.views
    loader = ViewLoader(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                        batch_size=a.batch, views=a.views, pad=4, flip=True, mean=MEAN, std=STD, seed=0,
                        channels_last=True)
    ours = rate(loader, a.batches, per_batch)
    print(f"| pipeline ({a.views} views, batch {a.batch}, {a.threads} threads) | views/s | vs dkel |")
    print("|---|---|---|")
    print(f"| dkel ViewLoader (uint8 tensors, vectorised crop/flip) | {ours:,.0f} | 1.00 |")
    dataset = MultiViewImages(images, labels, a.views)
    for workers in (int(w) for w in a.workers.split(",")):
        dl = DataLoader(dataset, batch_size=a.batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
        theirs = rate(dl, max(4, a.batches // 8), per_batch)
        print(f"| torchvision transforms + DataLoader, num_workers={workers} | {theirs:,.0f} | {theirs / ours:.3f} |")


if __name__ == "__main__":
    main()
