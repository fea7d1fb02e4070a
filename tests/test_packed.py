"""Packed inference: exported models predict exactly what the float-simulated models predict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnnbench
from bnnbench import BinaryConv2d, BinaryLinear, build_model
from bnnbench.data import make_data
from bnnbench.packed import (
    BitStages,
    PackedBinaryLayer,
    chain_in_bits,
    export_packed,
    load_packed,
    save_packed,
    set_backend,
)
from bnnbench.runners.bench_model import randomise_batchnorm


def predictions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in images.split(100)])


PACKABLE = [m for m in bnnbench.list_methods() if bnnbench.get_method(m).binary_weights and bnnbench.get_method(m).binary_activations]


def small_binary_net(method: str) -> nn.Module:
    """Every packed-layer shape in one small net: 3x3 (multi-word channels), 3x3 stride 2, 1x1, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.Hardtanh(),
        BinaryConv2d(16, 70, 3, padding=1, method=method),
        nn.BatchNorm2d(70),
        nn.Hardtanh(),
        BinaryConv2d(70, 24, 3, stride=2, padding=1, method=method),
        nn.BatchNorm2d(24),
        nn.Hardtanh(),
        BinaryConv2d(24, 33, 1, method=method),
        nn.BatchNorm2d(33),
        nn.Hardtanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        BinaryLinear(33, 10, method=method, bias=True),
    )


def check_packed_matches(model: nn.Module, images: torch.Tensor, exact_scales: bool) -> None:
    model.eval()
    packed = export_packed(model)
    expected, got = predictions(model, images), predictions(packed, images)
    assert torch.equal(expected.argmax(1), got.argmax(1))
    if exact_scales:
        # integer-exact binary convs times exactly representable factors: only later summation orders differ
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    float_path = predictions(set_backend(packed, "float"), images)  # the same bits through F.conv2d
    torch.testing.assert_close(float_path, got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", PACKABLE)
def test_packed_layers_match_float_layers(method):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = small_binary_net(method)
    randomise_batchnorm(model, g)
    for layer in model.modules():
        if isinstance(layer, (BinaryConv2d, BinaryLinear)):
            for p in layer.activation_params.values():  # e.g. ReActNet's learned thresholds
                p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    scale = bnnbench.get_method(method).scale
    check_packed_matches(model, torch.randn(48, 3, 12, 12, generator=g), exact_scales=scale in ("none", "learned_alpha", "power_of_two"))


def test_resnet20_backbone_exports():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = build_model("resnet20", "biper")
    randomise_batchnorm(model, g)
    assert len(export_packed(model).packed_layers) == 18
    check_packed_matches(model, torch.randn(16, 3, 32, 32, generator=g), exact_scales=True)


@pytest.mark.slow
def test_trained_cifar_model_exports_with_identical_predictions(cifar10_dir, tmp_path):
    """ResNet-20 + BiPer, stage 2, trained a few steps on CIFAR-10; 300 test images."""
    torch.manual_seed(0)
    data = make_data("cifar10", data_dir=cifar10_dir, batch_size=64, train_subset=192, test_subset=300, augment=False, loader="torch")
    model = build_model("resnet20", "biper", stage=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for images, labels in data.train:
        loss = F.cross_entropy(model(images), labels) + bnnbench.regularization_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    model.eval()
    test_images = torch.cat([images for images, _ in data.test])
    assert len(test_images) == 300
    packed = export_packed(model)
    expected, got = predictions(model, test_images), predictions(packed, test_images)
    assert (expected.argmax(1) == got.argmax(1)).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    path = save_packed(packed, tmp_path / "model.packed.pt")
    reloaded = load_packed(path)
    assert torch.equal(predictions(reloaded, test_images[:50]), got[:50])
    assert path.stat().st_size < 0.25 * sum(p.numel() * 4 for p in model.parameters())


def test_save_load_roundtrip_keeps_every_tensor(tmp_path):
    g = torch.Generator().manual_seed(1)
    model = build_model("resnet20", "reactnet")  # activation parameters (beta) and an analytic scale
    for layer in model.modules():
        if isinstance(layer, PackedBinaryLayer) or not hasattr(layer, "activation_params"):
            continue
        for p in layer.activation_params.values():
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    randomise_batchnorm(model, g)
    packed = export_packed(model.eval())
    reloaded = load_packed(save_packed(packed, tmp_path / "sub" / "m.pt"))
    state, again = packed.state_dict(), reloaded.state_dict()
    assert state.keys() == again.keys() and any(k.endswith("activation_params.beta") for k in state)
    assert all(torch.equal(state[k], again[k]) for k in state)
    images = torch.randn(8, 3, 16, 16, generator=g)
    assert torch.equal(predictions(reloaded, images), predictions(packed, images))
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_bits_are_one_bit_per_weight():
    model = build_model("resnet20", "biper")
    packed = export_packed(model)
    layer = packed.get_submodule("stages.2.1.conv2")  # 64 -> 64, 3x3: one 64-bit word per tap
    assert isinstance(layer, PackedBinaryLayer) and layer.bits.dtype == torch.int64
    assert tuple(layer.bits.shape) == (64, 9)
    assert layer.alpha is not None and layer.weight_scale is None


def test_unpackable_models_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="keeps real weights"):
        export_packed(build_model("resnet20", "fp"))
    with pytest.raises(ValueError, match="stage 1"):
        export_packed(build_model("resnet20", "biper", stage=1))
    with pytest.raises(ValueError, match="real activations"):
        export_packed(build_model("resnet20", "biper", binary_activations=False))
    with pytest.raises(ValueError, match="no binary layers"):
        export_packed(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(FileNotFoundError, match="bnnbench export"):
        load_packed(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match="not a bnnbench packed model"):
        load_packed(other)


def chained_matches(model: nn.Module, images: torch.Tensor) -> None:
    """The model chained in bits predicts what the float model predicts, logits within float rounding."""
    model.eval()
    chained = chain_in_bits(export_packed(model))
    assert isinstance(chained.stages, BitStages)
    expected, got = predictions(model, images), predictions(chained, images)
    assert torch.equal(expected.argmax(1), got.argmax(1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("skip", ["double", "single"])
def test_cifar_resnet_chained_in_bits_predicts_like_the_float_model(skip):
    """CIFAR ResNet-20: BN folded, residual adds, parameter-free (average-pool) downsample shortcuts."""
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = build_model("resnet20", "biper", skip=skip)
    randomise_batchnorm(model, g)
    chained_matches(model, torch.randn(24, 3, 32, 32, generator=g))


def test_chained_in_bits_with_streaming_stores(monkeypatch):
    """The sign epilogues' float output written with non-temporal stores (every output streamed) is the same."""
    monkeypatch.setenv("BNNBENCH_STREAM_BYTES", "0")
    g = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    model = build_model("resnet20", "biper")
    randomise_batchnorm(model, g)
    chained_matches(model, torch.randn(8, 3, 32, 32, generator=g))


def test_imagenet_resnet_chained_in_bits_predicts_like_the_float_model():
    """ImageNet ResNet-18 on 64x64 images: 7x7 stem, max-pool, 1x1 conv + BN stride-2 downsamples, 2x2 last stage."""
    g = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    model = build_model("resnet18", "biper", family="imagenet", num_classes=50)
    randomise_batchnorm(model, g)
    chained_matches(model, torch.randn(6, 3, 64, 64, generator=g))


def test_chain_in_bits_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="expects a packed model"):
        chain_in_bits(build_model("resnet20", "biper"))
    with pytest.raises(ValueError, match="otherwise than sign"):
        chain_in_bits(export_packed(build_model("resnet20", "reactnet")))  # learned thresholds before the sign
    with pytest.raises(ValueError, match="BasicBlocks"):
        chain_in_bits(export_packed(small_binary_net("biper")))


def test_int8_backend_equals_the_xnor_kernel():
    """The int8 path (oneDNN) computes the same integer convolutions: same logits as the packed kernel."""
    g = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    model = small_binary_net("biper")
    randomise_batchnorm(model, g)
    packed = export_packed(model.eval())
    images = torch.randn(16, 3, 12, 12, generator=g)
    xnor = predictions(packed, images)
    int8 = predictions(set_backend(packed, "int8"), images)
    torch.testing.assert_close(int8, xnor, atol=1e-5, rtol=1e-5)
    assert torch.equal(int8.argmax(1), predictions(model, images).argmax(1))
