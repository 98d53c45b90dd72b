"""DenseNet-BC for 32x32 inputs (DenseNet-40-12: growth 12, 3 blocks of 6 layers)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .core import Backbone, Tail
from .packing import channels_last, packable


@packable
class DenseLayer(nn.Module):
    """Appends `growth` new channels to its input; packed (groups = K) it appends them to each peer's."""

    groups = 1

    def __init__(self, cin: int, growth: int, bottleneck: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, bottleneck * growth, 1, bias=False),
            nn.BatchNorm2d(bottleneck * growth), nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        new = self.layers(x)
        if self.groups == 1:
            return torch.cat([x, new], dim=1)
        k = self.groups
        if channels_last(x):
            b, _, h, w = x.shape
            out = torch.cat([t.permute(0, 2, 3, 1).unflatten(3, (k, -1)) for t in (x, new)], dim=4)  # [B, H, W, K, C]
            return out.view(b, h, w, -1).permute(0, 3, 1, 2)
        return torch.cat([x.unflatten(1, (k, -1)), new.unflatten(1, (k, -1))], dim=2).flatten(1, 2)


def dense_block(cin: int, layers: int, growth: int, bottleneck: int) -> nn.Sequential:
    return nn.Sequential(*(DenseLayer(cin + i * growth, growth, bottleneck) for i in range(layers)))


def transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2, ceil_mode=True))


def init_densenet(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return module


def densenet_bc(num_classes: int, in_channels: int = 3, *, growth: int = 12, layers: int = 6,
                bottleneck: int = 4, compression: float = 0.5) -> Backbone:
    channels = 2 * growth
    trunk: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
    for _ in range(2):
        trunk.append(dense_block(channels, layers, growth, bottleneck))
        channels += layers * growth
        trunk.append(transition(channels, int(channels * compression)))
        channels = int(channels * compression)
    trunk_channels, feature_dim = channels, channels + layers * growth

    def make_tail() -> Tail:
        stage = nn.Sequential(dense_block(trunk_channels, layers, growth, bottleneck),
                              nn.BatchNorm2d(feature_dim), nn.ReLU(inplace=True))
        return init_densenet(Tail(stage, nn.Linear(feature_dim, num_classes)))

    return Backbone(init_densenet(nn.Sequential(*trunk)), make_tail, feature_dim, trunk_channels)
