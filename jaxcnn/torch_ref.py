"""PyTorch reference models for the parity tests and the throughput benchmark (needs torch).

Nothing in the library imports this module: torch is only in the `test` and `bench` extras.
DenseNet and ResNet reproduce torchvision's classes (same module names, so `state_dict()` keys
are exactly torchvision's and its checkpoints load); ResDenseNet is seed 004's class verbatim.
CIFAR variants take a torchvision model and swap the stem, as CIFAR code usually does. The
remaining families use the jaxcnn module names directly, so `jaxcnn.convert` needs no renames.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------
# torchvision.models.densenet (v0.20 layout; memory_efficient checkpointing left out: it changes
# no weights or outputs)
# --------------------------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1,
                               bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: List[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                                bn_size=bn_size, drop_rate=drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                              bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC."""

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features,
                                bn_size=bn_size, growth_rate=growth_rate, drop_rate=drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features,
                                    num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet_cifar(growth_rate: int, block_config: Sequence[int], num_classes: int) -> DenseNet:
    """DenseNet-BC for 32x32 (jaxcnn `stem='cifar'`): conv0 becomes a 3x3/1 conv of 2k channels
    and norm0/relu0/pool0 go; every other key stays torchvision's."""
    model = DenseNet(growth_rate, block_config, 2 * growth_rate, num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    del model.features.norm0, model.features.relu0, model.features.pool0
    return model


# --------------------------------------------------------------------------------------------
# torchvision.models.resnet
# --------------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet (v1.5: stride on the bottleneck's 3x3)."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int],
                 num_classes: int = 1000, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.dilation = 1
        replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_cifar(block, layers: Sequence[int], num_classes: int) -> ResNet:
    """Seed 001's CIFAR ResNet in torchvision naming: a 3x3/1 `conv1`, no max-pool."""
    model = ResNet(block, layers, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


# --------------------------------------------------------------------------------------------
# Pre-activation ResNet (He et al. 2016, v2) in torchvision naming; the projection shortcut sees
# the pre-activated input (`downsample.0`, a lone conv), as jaxcnn's preact blocks do.
# --------------------------------------------------------------------------------------------


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(conv1x1(inplanes, planes, stride))

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = self.downsample(pre) if self.downsample is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(conv1x1(inplanes, planes * 4, stride))

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = self.downsample(pre) if self.downsample is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """ResNet v2: no BN after the stem conv; a final BN-ReLU (`bn_final`) before pooling."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 10, stem: str = "cifar"):
        super().__init__()
        if stem == "cifar":
            self.conv1 = conv3x3(3, 64)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, n in enumerate(layers):
            planes, blocks = 64 * 2 ** i, []
            for j in range(n):
                blocks.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn_final = nn.BatchNorm2d(inplanes)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.relu(self.bn_final(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------
# Seed 004's ResDenseNet, verbatim (comments translated and shortened)
# --------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """Pre-activation bottleneck dense layer: BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, then concat."""

    def __init__(self, in_channels, growth_rate, bn_size=4):
        super(DenseLayer, self).__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate,
                               kernel_size=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate,
                               kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class DenseResidualBlock(nn.Module):
    """Dense residual block: dense connections inside, compress to the input width, add outside."""

    def __init__(self, in_channels, num_layers, growth_rate, bn_size=4):
        super(DenseResidualBlock, self).__init__()
        self.dense_layers = nn.ModuleList()
        for i in range(num_layers):
            self.dense_layers.append(
                DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size)
            )
        total_channels = in_channels + num_layers * growth_rate
        self.compress = nn.Sequential(
            nn.BatchNorm2d(total_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(total_channels, in_channels, kernel_size=1, stride=1, bias=False)
        )

    def forward(self, x):
        features = x
        for layer in self.dense_layers:
            features = layer(features)
        out = self.compress(features) + x
        return out


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-AvgPool."""

    def __init__(self, in_channels, out_channels):
        super(Transition, self).__init__()
        self.add_module('bn', nn.BatchNorm2d(in_channels))
        self.add_module('relu', nn.ReLU(inplace=True))
        self.add_module('conv', nn.Conv2d(in_channels, out_channels,
                                          kernel_size=1, stride=1, bias=False))
        self.add_module('pool', nn.AvgPool2d(kernel_size=2, stride=2))


class ResDenseNet(nn.Module):
    """Stem -> [DRB -> Transition] x 3 -> DRB -> BN -> ReLU -> GAP -> FC."""

    def __init__(self, growth_rate=32, block_config=(3, 4, 6, 4),
                 num_init_features=64, bn_size=4, num_classes=1000):
        super(ResDenseNet, self).__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, num_init_features, kernel_size=7, stride=2,
                      padding=3, bias=False),
            nn.BatchNorm2d(num_init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.stages.append(
                DenseResidualBlock(num_features, num_layers, growth_rate, bn_size)
            )
            if i != len(block_config) - 1:
                next_features = num_features * 2
                self.transitions.append(
                    Transition(num_features, next_features)
                )
                num_features = next_features
        self.final_bn = nn.BatchNorm2d(num_features)
        self.classifier = nn.Linear(num_features, num_classes)
        self._initialize_weights()

    def _initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        x = F.relu(self.final_bn(x), inplace=True)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def resdensenet_cifar(num_classes: int) -> ResDenseNet:
    """Seed 004's ResDenseNet with jaxcnn's 32x32 stem: 3x3/1 conv-BN-ReLU, no max-pool (keys
    `stem.0`/`stem.1` unchanged)."""
    model = ResDenseNet(num_classes=num_classes)
    model.stem[0] = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.stem[0].weight, mode="fan_out", nonlinearity="relu")
    model.stem[3] = nn.Identity()
    return model


# --------------------------------------------------------------------------------------------
# Families with no torchvision original: module names are jaxcnn's (block1.conv <-> block1/conv).
# --------------------------------------------------------------------------------------------


class ConvBNAct(nn.Module):
    """Conv (padding k // 2) -> BN -> ReLU, as `jaxcnn.layers.ConvBNAct`."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class SimpleCNN(nn.Module):
    """Seed 002's CNN: 3 x conv-BN-ReLU (max-pool after the first two), GAP, FC-128, dropout."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128),
                 hidden: int = 128, dropout: float = 0.5):
        super().__init__()
        cin = 3
        for i, w in enumerate(widths):
            setattr(self, f"block{i + 1}", ConvBNAct(cin, w, bias=True))
            cin = w
        self.n = len(widths)
        self.fc1 = nn.Linear(cin, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.n):
            x = getattr(self, f"block{i + 1}")(x)
            if i < self.n - 1:
                x = F.max_pool2d(x, 2)
        x = self.dropout(F.relu(self.fc1(x.mean((2, 3)))))
        return self.head(x)


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-BN for 32x32: conv{i} = conv(bias)-BN-ReLU, 'M' = 2x2 max-pool, GAP, linear."""

    def __init__(self, num_classes: int = 10, cfg: Sequence[Union[int, str]] = VGG16):
        super().__init__()
        self.cfg, cin, i = tuple(cfg), 3, 0
        for v in self.cfg:
            if v != "M":
                i += 1
                setattr(self, f"conv{i}", ConvBNAct(cin, v, bias=True))
                cin = v
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        i = 0
        for v in self.cfg:
            if v == "M":
                x = F.max_pool2d(x, 2)
            else:
                i += 1
                x = getattr(self, f"conv{i}")(x)
        return self.classifier(x.mean((2, 3)))


MOBILENET_V1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
                (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = ConvBNAct(cin, cin, 3, stride, groups=cin)
        self.pw = ConvBNAct(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw(self.dw(x))


class MobileNetV1(nn.Module):
    """MobileNet v1 for 32x32: 3x3/1 stem, 13 depthwise-separable units, GAP, linear."""

    def __init__(self, num_classes: int = 10, width: float = 1.0,
                 cfg: Sequence = MOBILENET_V1):
        super().__init__()
        scale = lambda c: max(8, int(c * width))  # noqa: E731
        self.stem = ConvBNAct(3, scale(32))
        cin = scale(32)
        for i, (c, s) in enumerate(cfg):
            setattr(self, f"ds{i + 1}", DepthwiseSeparable(cin, scale(c), s))
            cin = scale(c)
        self.n = len(cfg)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i in range(self.n):
            x = getattr(self, f"ds{i + 1}")(x)
        return self.classifier(x.mean((2, 3)))


# --------------------------------------------------------------------------------------------

_BUILDERS: Dict[str, Callable[[int], nn.Module]] = {
    "simple_cnn": lambda n: SimpleCNN(n),
    "vgg16_bn_cifar": lambda n: VGG(n),
    "mobilenet_v1_cifar": lambda n: MobileNetV1(n),
    "resnet18": lambda n: ResNet(BasicBlock, [2, 2, 2, 2], num_classes=n),
    "resnet34": lambda n: ResNet(BasicBlock, [3, 4, 6, 3], num_classes=n),
    "resnet50": lambda n: ResNet(Bottleneck, [3, 4, 6, 3], num_classes=n),
    "resnet18_cifar": lambda n: resnet_cifar(BasicBlock, [2, 2, 2, 2], n),
    "preact_resnet18_cifar": lambda n: PreActResNet(PreActBasicBlock, [2, 2, 2, 2], n, "cifar"),
    "resnet50v2": lambda n: PreActResNet(PreActBottleneck, [3, 4, 6, 3], n, "imagenet"),
    "densenet121": lambda n: DenseNet(32, (6, 12, 24, 16), 64, num_classes=n),
    "densenet169": lambda n: DenseNet(32, (6, 12, 32, 32), 64, num_classes=n),
    "densenet201": lambda n: DenseNet(32, (6, 12, 48, 32), 64, num_classes=n),
    "densenet_bc_100_12": lambda n: densenet_cifar(12, (16, 16, 16), n),
    "densenet_bc_250_24": lambda n: densenet_cifar(24, (41, 41, 41), n),
    "densenet_bc_190_40": lambda n: densenet_cifar(40, (31, 31, 31), n),
    "densenet_bc_small": lambda n: densenet_cifar(12, (3, 3, 3), n),
    "resdensenet": lambda n: ResDenseNet(num_classes=n),
    "resdensenet_cifar": resdensenet_cifar,
}


def list_torch_models() -> List[str]:
    """jaxcnn model names that have a PyTorch reference here."""
    return sorted(_BUILDERS)


def torch_model(name: str, num_classes: int) -> nn.Module:
    """The PyTorch twin of `jaxcnn.create_model(name, num_classes=num_classes)` (default
    configuration), freshly initialised and in train mode, as torch modules start.

    Args:
      name: a jaxcnn model name from `list_torch_models()`.
      num_classes: size of the classifier.
    """
    if name not in _BUILDERS:
        raise ValueError(f"no PyTorch reference for {name!r}; have: {', '.join(list_torch_models())}")
    return _BUILDERS[name](num_classes)
