"""Backbones: output shape, parameter counts (upstream), which layers are binary, and that they train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnnbench
from bnnbench import BinaryConv2d, binary_layers, build_model

CIFAR = [("resnet20", 19 - 1), ("resnet18", 16), ("vgg_small", 5)]  # (net, number of binary convs)
IMAGENET = [("resnet18", 16), ("resnet34", 32)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Upstream counts (learned alpha per output channel included; CIFAR ResNet-18 11,005,002 is upstream BiPer's
# single-skip model, and the double skip has the same parameters).
@pytest.mark.parametrize(
    "net,family,method,expected",
    [
        ("resnet18", "cifar", "biper", 11_005_002),
        ("resnet20", "cifar", "biper", 270_522),  # 0.27M (upstream's ResNet-20) + 288 alphas
        ("resnet34", "imagenet", "biper", 21_806_248),  # torchvision 21,797,672 + BN1d 1,024 + 7,552 alphas
        ("resnet18", "imagenet", "biper", 11_694_376),
        ("vgg_small", "cifar", "biper", 4_661_770),
        # full precision: torchvision-style counts without alpha
        ("resnet18", "cifar", "fp", 11_005_002 - 3840),
        ("resnet18", "imagenet", "fp", 11_689_512 + 2 * 512),  # torchvision resnet18 + BatchNorm1d head
    ],
)
def test_parameter_counts(net, family, method, expected):
    assert n_params(build_model(net, method, family=family)) == expected


def test_resnet18_single_skip_same_params_different_graph():
    torch.manual_seed(0)
    double = build_model("resnet18", "biper", skip="double")
    torch.manual_seed(0)
    single = build_model("resnet18", "biper", skip="single")
    assert n_params(double) == n_params(single) == 11_005_002
    assert single.spec.options["skip"] == "single"
    x = torch.randn(2, 3, 32, 32)
    double.eval(), single.eval()
    assert not torch.allclose(double(x), single(x))


@pytest.mark.parametrize("net,n_binary", CIFAR)
def test_cifar_shapes_and_binary_layers(net, n_binary):
    model = build_model(net, "biper", num_classes=7)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    layers = [layer for _, layer in binary_layers(model)]
    assert len(layers) == n_binary
    assert all(isinstance(layer, BinaryConv2d) and layer.kernel_size == (3, 3) for layer in layers)
    # first conv and last FC are real
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert not isinstance(convs[0], BinaryConv2d) and convs[0].in_channels == 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and type(linears[0]) is nn.Linear


@pytest.mark.parametrize("net,n_binary", IMAGENET)
def test_imagenet_shapes_and_binary_layers(net, n_binary):
    model = build_model(net, "recu", family="imagenet")
    model.eval()
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert len(list(binary_layers(model))) == n_binary
    stem = model.stem[0]
    assert type(stem) is nn.Conv2d and stem.kernel_size == (7, 7) and stem.stride == (2, 2)
    downsamples = [m for m in model.modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)]
    assert len(downsamples) == 3 and all(m.stride == (2, 2) for m in downsamples)
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(float(m.weight.detach().max()) == pytest.approx(1e-8) for m in bn)


def test_fp_model_has_no_binary_behaviour():
    model = build_model("resnet20", "fp")
    layers = [layer for _, layer in binary_layers(model)]
    assert all(not layer.binary_weights and not layer.binary_activations and layer.alpha is None for layer in layers)
    assert model.spec.nonlinearity == "relu"
    assert not any(isinstance(m, nn.Hardtanh) for m in model.modules())


def test_stage_switch_changes_weights_only():
    model = build_model("resnet20", "biper", stage=1)
    layer = next(layer for _, layer in binary_layers(model))
    w1 = layer.forward_weight().detach()
    assert torch.allclose(w1, torch.sin(20.0 * layer.weight.detach()))
    bnnbench.set_stage(model, 2)
    w2 = layer.forward_weight().detach()
    assert set(w2.unique().tolist()) <= {-1.0, 1.0}
    assert {layer.stage for _, layer in binary_layers(model)} == {2}
    with pytest.raises(ValueError, match="stage"):
        bnnbench.set_stage(model, 3)


def test_real_activations_option_table2():
    model = build_model("resnet20", "biper", binary_activations=False)
    assert all(not layer.binary_activations for _, layer in binary_layers(model))
    assert model.spec.binary_activations is False and model.spec.nonlinearity == "relu"


def test_unknown_net_and_option_errors():
    with pytest.raises(ValueError, match="valid cifar networks: resnet18, resnet20, vgg_small"):
        build_model("resnet50", "biper")
    with pytest.raises(TypeError, match="no option depth"):
        build_model("resnet20", "biper", depth=3)
    with pytest.raises(ValueError, match="skip"):
        build_model("resnet18", "biper", skip="triple")


@pytest.mark.parametrize(
    "net,family,method,size",
    [
        ("resnet20", "cifar", "biper", 32),
        ("resnet18", "cifar", "recu", 16),  # global pooling: any input size works; small keeps CI fast
        ("vgg_small", "cifar", "reste", 32),  # the 8192-wide FC needs 32x32
        ("resnet18", "imagenet", "biper", 64),
        ("resnet20", "cifar", "fp", 32),
    ],
)
def test_a_few_steps_reduce_the_loss(net, family, method, size):
    """Fit one fixed batch whose class is a per-channel colour offset: the loss must drop (stage 2)."""
    torch.manual_seed(0)
    model = build_model(net, method, family=family, num_classes=4)
    y = torch.arange(16) % 4
    x = torch.randn(16, 3, size, size) + 2 * torch.randn(4, 3, 1, 1)[y]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        reg = bnnbench.regularization_loss(model)
        (loss + reg if reg is not None else loss).backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
