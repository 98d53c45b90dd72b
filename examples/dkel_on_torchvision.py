"""Train DKEL on a torchvision network with your own Dataset, then use the deployed network.

    python examples/dkel_on_torchvision.py                     # 600 images, 3 epochs, a few minutes on a CPU
    python examples/dkel_on_torchvision.py --images 48 --epochs 1 --out /tmp/shapes   # a smoke run

Any map-style Dataset that yields (image, label) works; the image may be a PIL image, a CHW tensor
(uint8, or float in [0, 1]) or an HWC uint8 array.  Here: circles, squares and triangles drawn with PIL."""
import argparse
import random

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

import dkel


class Shapes(Dataset):
    classes = ["circle", "square", "triangle"]

    def __init__(self, n: int, size: int = 32, seed: int = 0):
        rng = random.Random(seed)
        self.items = [(i % 3, rng.randint(6, 12), rng.randint(12, size - 12), rng.randint(12, size - 12),
                       tuple(rng.randint(60, 255) for _ in range(3))) for i in range(n)]
        self.size = size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        label, r, x, y, color = self.items[i]
        image = Image.new("RGB", (self.size, self.size), (20, 20, 20))
        draw = ImageDraw.Draw(image)
        if label == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        elif label == 1:
            draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
        return image, label


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600, help="training images (a third of that for testing)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="torchvision:resnet18")
    p.add_argument("--out", default="runs/examples/shapes")
    args = p.parse_args()

    train, test = Shapes(args.images), Shapes(max(args.images // 3, 3), seed=1)
    run = dkel.fit("dkel", model=args.model, data=(train, test), out=args.out, overwrite=True,
                   epochs=args.epochs, batch_size=32, lr=0.05)
    print(f"run folder {run.dir}: deployed (teacher peer 1) accuracy {run.deploy_acc:.3f}")

    net = dkel.load(run.dir)  # the deployed plain torchvision network, with its preprocessing
    images = [test[i][0] for i in range(6)]
    predicted = net.preprocessing.labels(net(net.preprocessing(images)))
    print("predicted:", predicted)
    print("true:     ", [Shapes.classes[test[i][1]] for i in range(6)])


if __name__ == "__main__":
    main()
