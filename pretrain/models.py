"""DeepCluster networks: AlexNet-BN and VGG16-BN (+ frozen Sobel), ResNet-50 as a modern option.

Module names follow the authors' released checkpoints (PROTOCOLS.md §1) so their state dicts
load once the ``features.module.`` prefix is reduced to ``features.``:

* AlexNet-BN ``features``: conv1 0, conv2 4, conv3 8, conv4 11, conv5 14 (BN right after
  each); ``classifier`` = Dropout Linear(fc6) ReLU Dropout Linear(fc7) ReLU; ``top_layer``.
* VGG16-BN ``features``: torchvision's ``vgg16_bn`` layout; ``classifier`` = Linear(fc6) ReLU
  Dropout Linear(fc7) ReLU; ``top_layer``.
* ``sobel.0`` (1x1 grey) and ``sobel.1`` (3x3 Sobel pair), frozen.

Every network exposes named taps (``conv1..conv5``, ``pool5``, ``fc6``, ``fc7``,
``fc7_prerelu``) through :meth:`TapNet.forward_taps`, which stops after the deepest requested
tap. ``embed`` gives DeepCluster's clustering feature (fc7 before its ReLU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dcbench.core import UserError

ARCHS = ("alexnet", "vgg16", "resnet50")
CONV_TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def sobel_filter() -> nn.Sequential:
    """Frozen grey (mean of the normalised RGB) followed by the two 3x3 Sobel kernels."""
    grey = nn.Conv2d(3, 1, kernel_size=1, stride=1, padding=0)
    grey.weight.data.fill_(1.0 / 3.0)
    grey.bias.data.zero_()
    sobel = nn.Conv2d(1, 2, kernel_size=3, stride=1, padding=1)
    sobel.weight.data[0, 0].copy_(torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]]))
    sobel.weight.data[1, 0].copy_(torch.tensor([[1., 2., 1.], [0., 0., 0.], [-1., -2., -1.]]))
    sobel.bias.data.zero_()
    seq = nn.Sequential(grey, sobel)
    for p in seq.parameters():
        p.requires_grad = False
    return seq


def init_weights(module: nn.Module) -> None:
    """The paper's init: conv N(0, sqrt(2/(kh*kw*out))), BN (1, 0), Linear N(0, 0.01), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


def make_top_layer(in_dim: int, k: int) -> nn.Linear:
    """A fresh k-way head, N(0, 0.01) weights, zero bias (drawn from torch's global RNG)."""
    head = nn.Linear(in_dim, k)
    head.weight.data.normal_(0, 0.01)
    head.bias.data.zero_()
    return head


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a network's shape: enough to rebuild it from a checkpoint."""

    arch: str = "alexnet"
    sobel: bool = True
    fc_dim: int = 4096
    k: int | None = None  # rows of top_layer, None = no head

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}.")


class TapNet(nn.Module):
    """A sequential network whose intermediate outputs can be read by name."""

    spec: ModelSpec
    embed_tap: str = "fc7_prerelu"

    def stages(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """Ordered (module, taps read after it) pairs covering the whole forward pass."""
        raise NotImplementedError

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(t for _, taps in self.stages() for t in taps)

    def forward_taps(self, x: torch.Tensor, taps) -> dict[str, torch.Tensor]:
        """Run up to the deepest tap in ``taps`` and return those outputs by name."""
        wanted = set(taps)
        unknown = wanted - set(self.tap_names)
        if unknown:
            raise ValueError(f"unknown tap(s) {sorted(unknown)} for {self.spec.arch}; "
                             f"available: {', '.join(self.tap_names)}.")
        out: dict[str, torch.Tensor] = {}
        for module, names in self.stages():
            x = module(x)
            for n in names:
                if n in wanted:
                    out[n] = x
            if len(out) == len(wanted):
                break
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_taps(x, [self.embed_tap])[self.embed_tap]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.embed_tap == "fc7_prerelu":
            x = torch.relu(x)
        return self.top_layer(x) if self.top_layer is not None else x

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything but the frozen Sobel and the per-epoch head."""
        head = {id(p) for p in self.top_layer.parameters()} if self.top_layer is not None else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head]


class _Flatten(nn.Module):
    def forward(self, x):
        return torch.flatten(x, 1)


def _chain(model: TapNet, features_taps: dict[int, str], classifier_taps: dict[int, str]
           ) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """Stages of a sobel -> features -> pool -> flatten -> classifier network."""
    stages: list[tuple[nn.Module, tuple[str, ...]]] = []
    if model.sobel is not None:
        stages.append((model.sobel, ()))
    for i, m in enumerate(model.features):
        stages.append((m, (features_taps[i],) if i in features_taps else ()))
    stages.append((model.pool, ("pool5",)))
    stages.append((_Flatten(), ()))
    for i, m in enumerate(model.classifier):
        stages.append((m, (classifier_taps[i],) if i in classifier_taps else ()))
    return stages


class AlexNet(TapNet):
    """AlexNet-BN of DeepCluster (single tower, conv biases kept, no LRN)."""

    CONV_IDX = (0, 4, 8, 11, 14)

    def __init__(self, sobel: bool = True, fc_dim: int = 4096, k: int | None = None):
        super().__init__()
        self.spec = ModelSpec("alexnet", sobel, fc_dim, k)
        cfg = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1),
               (256, 3, 1, 1), "M"]
        layers: list[nn.Module] = []
        c_in = 2 if sobel else 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            else:
                c_out, ks, st, pad = v
                layers += [nn.Conv2d(c_in, c_out, ks, st, pad), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((6, 6))  # identity at 224 input
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, fc_dim), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(fc_dim, fc_dim), nn.ReLU())  # not in place: taps
        self.top_layer = nn.Linear(fc_dim, k) if k else None
        init_weights(self)
        self.sobel = sobel_filter() if sobel else None

    def stages(self):
        # conv c's tap is the output of the ReLU after it (index + 2): conv5 before its pool.
        return _chain(self, {i + 2: f"conv{n + 1}" for n, i in enumerate(self.CONV_IDX)},
                      {2: "fc6", 4: "fc7_prerelu", 5: "fc7"})


class VGG16(TapNet):
    """VGG16-BN of DeepCluster (torchvision ``vgg16_bn`` feature layout)."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, sobel: bool = True, fc_dim: int = 4096, k: int | None = None):
        super().__init__()
        self.spec = ModelSpec("vgg16", sobel, fc_dim, k)
        layers: list[nn.Module] = []
        c_in = 2 if sobel else 3
        self._block_ends: list[int] = []
        for v in self.CFG:
            if v == "M":
                self._block_ends.append(len(layers) - 1)  # the ReLU before each pool
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))  # identity at 224 input
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, fc_dim), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(fc_dim, fc_dim), nn.ReLU())  # not in place: taps
        self.top_layer = nn.Linear(fc_dim, k) if k else None
        init_weights(self)
        self.sobel = sobel_filter() if sobel else None

    def stages(self):
        return _chain(self, {i: f"conv{n + 1}" for n, i in enumerate(self._block_ends)},
                      {1: "fc6", 3: "fc7_prerelu", 4: "fc7"})


class ResNet50(TapNet):
    """torchvision ResNet-50 trunk (conv1..conv5 = stem, layer1..layer4), 2048-d embedding."""

    embed_tap = "pool5"

    def __init__(self, sobel: bool = False, fc_dim: int = 2048, k: int | None = None):
        super().__init__()
        from torchvision.models import resnet50

        self.spec = ModelSpec("resnet50", sobel, 2048, k)
        net = resnet50(weights=None)
        if sobel:
            net.conv1 = nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.maxpool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (net.layer1, net.layer2,
                                                              net.layer3, net.layer4)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.top_layer = nn.Linear(2048, k) if k else None
        if self.top_layer is not None:
            init_weights(self.top_layer)
        self.sobel = sobel_filter() if sobel else None

    def stages(self):
        s: list[tuple[nn.Module, tuple[str, ...]]] = []
        if self.sobel is not None:
            s.append((self.sobel, ()))
        s += [(self.stem, ("conv1",)), (self.maxpool, ()), (self.layer1, ("conv2",)),
              (self.layer2, ("conv3",)), (self.layer3, ("conv4",)), (self.layer4, ("conv5",)),
              (self.pool, ()), (_Flatten(), ("pool5",))]
        return s


def build_model(spec: ModelSpec) -> TapNet:
    """A freshly initialised network for ``spec`` (uses torch's global RNG)."""
    cls = {"alexnet": AlexNet, "vgg16": VGG16, "resnet50": ResNet50}[spec.arch]
    return cls(sobel=spec.sobel, fc_dim=spec.fc_dim, k=spec.k)


def embed_dim(model: TapNet) -> int:
    return 2048 if model.spec.arch == "resnet50" else model.spec.fc_dim
