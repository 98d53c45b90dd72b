"""ResNets: the CIFAR family (3 stages, 16/32/64 planes), ResNet-18/34 for 64x64 inputs and the
ImageNet ResNet-18/34 (224x224: 7x7 stride-2 stem with max-pool, as torchvision's)."""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from .core import Backbone, Tail
from .packing import packable


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


@packable
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, width: int | None = None):
        super().__init__()
        self.residual = nn.Sequential(*conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True),
                                      *conv_bn(planes, planes, 3))
        self.shortcut = shortcut(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.residual(x)
        out += self.shortcut(x)  # in place: BatchNorm keeps its input, not its output, for backward
        return out.relu_()


@packable
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, width: int | None = None):
        super().__init__()
        width = width or planes
        cout = planes * self.expansion
        self.residual = nn.Sequential(*conv_bn(cin, width, 1), nn.ReLU(inplace=True),
                                      *conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                      *conv_bn(width, cout, 1))
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.residual(x)
        out += self.shortcut(x)  # in place: BatchNorm keeps its input, not its output, for backward
        return out.relu_()


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*conv_bn(cin, cout, 1, stride))


def stage(block, cin: int, planes: int, blocks: int, stride: int, width_mult: int) -> nn.Sequential:
    width = planes * width_mult
    layers = [block(cin, planes, stride, width)]
    layers += [block(planes * block.expansion, planes, 1, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_resnet(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def resnet(num_classes: int, *, block, blocks: list[int], planes: list[int],
           stem: list[nn.Module], width_mult: int = 1) -> Backbone:
    """Stem, then all stages but the last in the trunk; the last stage opens each tail."""
    layers, cin = list(stem), planes[0]
    for i, (p, n) in enumerate(zip(planes[:-1], blocks[:-1])):
        layers.append(stage(block, cin, p, n, 1 if i == 0 else 2, width_mult))
        cin = p * block.expansion
    feature_dim = planes[-1] * block.expansion

    def make_tail() -> Tail:
        last = stage(block, cin, planes[-1], blocks[-1], 2, width_mult)
        return init_resnet(Tail(last, nn.Linear(feature_dim, num_classes)))

    return Backbone(init_resnet(nn.Sequential(*layers)), make_tail, feature_dim, cin)


def cifar_resnet(num_classes: int, in_channels: int = 3, *, blocks: int, block=BasicBlock,
                 width_mult: int = 1) -> Backbone:
    stem = [*conv_bn(in_channels, 16, 3), nn.ReLU(inplace=True)]
    return resnet(num_classes, block=block, blocks=[blocks] * 3, planes=[16, 32, 64],
                  stem=stem, width_mult=width_mult)


def tiny_resnet(num_classes: int, in_channels: int = 3, *, blocks: list[int]) -> Backbone:
    """ResNet-18/34 for 64x64: 7x7 stride-2 stem without max-pool."""
    stem = [*conv_bn(in_channels, 64, 7, 2), nn.ReLU(inplace=True)]
    return resnet(num_classes, block=BasicBlock, blocks=blocks,
                  planes=[64, 128, 256, 512], stem=stem)


def imagenet_resnet(num_classes: int, in_channels: int = 3, *, blocks: list[int]) -> Backbone:
    """ResNet-18/34 for 224x224: 7x7 stride-2 stem and 3x3 stride-2 max-pool (He et al. 2016)."""
    stem = [*conv_bn(in_channels, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    return resnet(num_classes, block=BasicBlock, blocks=blocks, planes=[64, 128, 256, 512], stem=stem)


CIFAR_RESNETS = {
    "resnet8": partial(cifar_resnet, blocks=1),
    "resnet14": partial(cifar_resnet, blocks=2),
    "resnet20": partial(cifar_resnet, blocks=3),
    "resnet32": partial(cifar_resnet, blocks=5),
    "resnet110": partial(cifar_resnet, blocks=12, block=Bottleneck),
    "wrn20_8": partial(cifar_resnet, blocks=2, block=Bottleneck, width_mult=8),
}
TINY_RESNETS = {
    "resnet18": partial(tiny_resnet, blocks=[2, 2, 2, 2]),
    "resnet34": partial(tiny_resnet, blocks=[3, 4, 6, 3]),
}
IMAGENET_RESNETS = {
    "resnet18_imagenet": partial(imagenet_resnet, blocks=[2, 2, 2, 2]),
    "resnet34_imagenet": partial(imagenet_resnet, blocks=[3, 4, 6, 3]),
}
