"""VGG-16 with BatchNorm for 32x32 inputs; the last conv group opens each tail."""
from __future__ import annotations

from torch import nn

from .core import Backbone, Tail


def conv_group(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
    # ceil_mode lets inputs smaller than 32x32 (down to 1x1 maps) pass every pool
    layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    return nn.Sequential(*layers)


def init_vgg(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return module


def vgg16(num_classes: int, in_channels: int = 3) -> Backbone:
    trunk = nn.Sequential(conv_group(in_channels, 64, 2), conv_group(64, 128, 2),
                          conv_group(128, 256, 3), conv_group(256, 512, 3))

    def make_tail() -> Tail:
        classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True),
                                   nn.Linear(512, 512), nn.ReLU(inplace=True),
                                   nn.Linear(512, num_classes))
        return init_vgg(Tail(conv_group(512, 512, 3), classifier))

    return Backbone(init_vgg(trunk), make_tail, feature_dim=512, trunk_channels=512)
