"""The four small networks of the experiment notes, as feature extractors of any input size.

Each net returns ``{"features": [B, num_features]}`` (plus ``"aux_logits"`` for the Inception-style
net while training); :func:`supcon.baseline.models.build_classifier` adds the classification head. A
net's own head, as the notes describe it, is its ``default_head`` / ``default_head_hidden`` (used
when ``--head`` is not given). Spatial sizes only shrink by pooling and end in adaptive pooling, so
every net works at 32, 128 and 224 px (and anything from 16 px up).

Each net lists its *blocks* in ``freeze_groups()``: what ``--freeze N`` counts. The stem, where
a net has one, belongs to block 1; the auxiliary classifiers are heads and never frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropBlock2d, SEModule
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias, "same" padding) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BlockNet(nn.Module):
    """``blocks`` (one per entry of ``channels``, built by ``make_block(in, out)``), then ``pool`` and flatten.

    Each block is one unit for ``--freeze``.
    """

    def __init__(self, channels: tuple[int, ...], make_block: Callable[[int, int], nn.Module], pool: nn.Module,
                 pooled_cells: int = 1):
        super().__init__()
        widths = (3, *channels)
        self.blocks = nn.Sequential(*(make_block(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.pool = pool
        self.num_features = channels[-1] * pooled_cells

    def freeze_groups(self) -> list[tuple[str, list[nn.Module]]]:
        return [(f"blocks.{i}", [block]) for i, block in enumerate(self.blocks)]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": torch.flatten(self.pool(self.blocks(images)), 1)}


class SimpleCNN(BlockNet):
    """The simple CNN: conv-ReLU-maxpool blocks, then a fully connected stack.

    The last feature map is average-pooled to a fixed ``pooled_size`` grid and flattened, so the
    fully connected stack (the default ``mlp`` head: Linear-ReLU-Linear, 256 hidden) sees the same
    number of inputs at any image size.

    Args:
        channels: output channels of each block (one block per entry; each halves the resolution).
        pooled_size: side of the grid the last feature map is pooled to before flattening.
    """

    default_head = "mlp"
    default_head_hidden = 256

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), pooled_size: int = 4):
        super().__init__(
            channels,
            lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                                              nn.MaxPool2d(2)),
            nn.AdaptiveAvgPool2d(pooled_size), pooled_cells=pooled_size * pooled_size,
        )


class PlainCNN(BlockNet):
    """The plain CNN: conv-BatchNorm-ReLU-DropBlock-avg-pool blocks, global average pooling, MLP head.

    DropBlock (Ghiasi et al. 2018) is timm's ``DropBlock2d``; timm clips the block to the feature
    map, so small maps at 32 px are fine. Default head: ``mlp`` (Linear-ReLU-Linear, 256 hidden).

    Args:
        channels: output channels of each block (each halves the resolution).
        drop_prob: DropBlock drop probability (training only).
        block_size: DropBlock block side.
    """

    default_head = "mlp"
    default_head_hidden = 256

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256), drop_prob: float = 0.1, block_size: int = 3):
        super().__init__(
            channels,
            lambda c_in, c_out: nn.Sequential(conv_bn_relu(c_in, c_out),
                                              DropBlock2d(drop_prob=drop_prob, block_size=block_size),
                                              nn.AvgPool2d(2)),
            nn.AdaptiveAvgPool2d(1),
        )


class SENet(BlockNet):
    """The SE-Net: conv blocks each followed by squeeze-and-excitation, global average pooling, MLP head.

    Each block is two conv-BN-ReLU layers, timm's ``SEModule`` (Hu et al. 2018) with
    ``1/reduction`` channels in its bottleneck, then 2x2 max-pooling. Default head: ``mlp-dropout``
    (Linear-LeakyReLU-Dropout(0.5)-Linear, 256 hidden).

    Args:
        channels: output channels of each block (each halves the resolution).
        reduction: squeeze-and-excitation reduction ratio.
    """

    default_head = "mlp-dropout"
    default_head_hidden = 256

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), reduction: int = 16):
        super().__init__(
            channels,
            lambda c_in, c_out: nn.Sequential(conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out),
                                              SEModule(c_out, rd_ratio=1.0 / reduction), nn.MaxPool2d(2)),
            nn.AdaptiveAvgPool2d(1),
        )


class InceptionBlock(nn.Module):
    """GoogLeNet's Inception module: 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches, concatenated."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3_reduce: int, ch3x3: int, ch5x5_reduce: int, ch5x5: int,
                 pool_proj: int):
        super().__init__()
        self.branch1 = conv_bn_relu(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(conv_bn_relu(in_channels, ch3x3_reduce, 1), conv_bn_relu(ch3x3_reduce, ch3x3, 3))
        self.branch3 = nn.Sequential(conv_bn_relu(in_channels, ch5x5_reduce, 1), conv_bn_relu(ch5x5_reduce, ch5x5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(in_channels, pool_proj, 1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class AuxClassifier(nn.Module):
    """GoogLeNet's auxiliary classifier: avg-pool to 4x4, 1x1 conv, FC-ReLU-Dropout(0.7)-FC."""

    def __init__(self, in_channels: int, num_outputs: int, hidden: int = 256):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = conv_bn_relu(in_channels, 64, 1)
        self.fc = nn.Sequential(nn.Linear(64 * 16, hidden), nn.ReLU(inplace=True), nn.Dropout(0.7),
                                nn.Linear(hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(self.pool(x)), 1))


class InceptionNet(nn.Module):
    """A small Inception/GoogLeNet-style net with two auxiliary classifiers (Szegedy et al. 2015).

    Stem (3x3 conv, max-pool), Inception 3a-3b, max-pool, 4a-4b, max-pool, 5a, global average
    pooling, dropout 0.4. The auxiliary classifiers read the outputs of 4a and 4b; they run only
    in training mode (``"aux_logits"`` in the output), where the loss adds them weighted by 0.3, as
    in the paper; in eval mode they are skipped. Default head: ``linear``.

    Args:
        num_outputs: outputs of the auxiliary classifiers (the number of classes, or 1 for BCE).
    """

    default_head = "linear"
    default_head_hidden = 256

    def __init__(self, num_outputs: int):
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(3, 32, 3), nn.MaxPool2d(3, stride=2, padding=1))
        self.inception3a = InceptionBlock(32, 16, 16, 24, 4, 8, 16)    # -> 64
        self.inception3b = InceptionBlock(64, 24, 16, 40, 8, 16, 16)   # -> 96
        self.pool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception4a = InceptionBlock(96, 40, 24, 56, 8, 16, 16)   # -> 128
        self.inception4b = InceptionBlock(128, 48, 32, 64, 8, 24, 24)  # -> 160
        self.pool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception5a = InceptionBlock(160, 64, 40, 80, 12, 24, 24)  # -> 192
        self.aux1 = AuxClassifier(self.inception4a.out_channels, num_outputs)
        self.aux2 = AuxClassifier(self.inception4b.out_channels, num_outputs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.4)
        self.num_features = self.inception5a.out_channels

    def freeze_groups(self) -> list[tuple[str, list[nn.Module]]]:
        return [
            ("stem+inception3a", [self.stem, self.inception3a]),
            ("inception3b", [self.inception3b]),
            ("inception4a", [self.inception4a]),
            ("inception4b", [self.inception4b]),
            ("inception5a", [self.inception5a]),
        ]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        x = self.pool3(self.inception3b(self.inception3a(self.stem(images))))
        x = self.inception4a(x)
        aux = [self.aux1(x)] if self.training else []
        x = self.inception4b(x)
        if self.training:
            aux.append(self.aux2(x))
        x = self.inception5a(self.pool4(x))
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"features": self.dropout(torch.flatten(self.pool(x), 1))}
        if self.training:
            out["aux_logits"] = aux
        return out


#: ``--model`` names of the custom nets.
CUSTOM_NETS: dict[str, type[nn.Module]] = {
    "simple_cnn": SimpleCNN,
    "plain_cnn": PlainCNN,
    "se_net": SENet,
    "inception_net": InceptionNet,
}
