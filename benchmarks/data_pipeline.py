"""Views per second of dkel's on-device multi-view loader against torchvision transforms
through a DataLoader (the usual pipeline, as in the released DKEL code), in one run.

Both make K augmented views (random crop 32 with 4 px zero padding, horizontal flip,
normalisation) of every image of CIFAR-sized uint8 data.

    python benchmarks/data_pipeline.py [--views 3] [--batch 128] [--batches 40] [--workers 0,2]
"""
import argparse
import statistics
import time

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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=40, help="batches per timed round")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
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
