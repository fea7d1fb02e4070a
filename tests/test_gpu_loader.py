"""The device-resident ("gpu") array loader gives today's batches bit for bit; the loader choice.

"Today's batches" are written out below as the per-batch loop the in-memory CIFAR path had
before the epoch plan existed: draw offsets and flips for one batch, gather, crop, flip,
normalise.  The loaders built the GPU way (the array resident on the device, the epoch's plan
moved there at once) and the host way must reproduce it exactly, on the CPU here and on a GPU
in the ``cuda`` test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bnnbench.data import DataError, make_data
from bnnbench.data.bundle import _choose_backend
from bnnbench.data.loaders import ArrayLoader
from bnnbench.data.sampling import STREAM_AUGMENT, generator
from bnnbench.data.transforms import CIFAR_PADDING, crop_flip_nhwc, draw_crop_flip, normalize_nhwc, pad_nhwc

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
# x * 1/(255 std) - mean/std with std = 1/255, mean = 0 is x itself: the pixels, exactly, on any device
IDENTITY_MEAN, IDENTITY_STD = (0.0, 0.0, 0.0), (1 / 255,) * 3


def reference_batches(images: np.ndarray, labels: np.ndarray, loader: ArrayLoader, mean=MEAN, std=STD):
    """The batches of ``loader``'s epoch as the per-batch CPU loop made them (bnnbench before the epoch plan)."""
    pixels = torch.from_numpy(images)
    if loader.augment:
        pixels = pad_nhwc(pixels, CIFAR_PADDING)
    targets = torch.from_numpy(labels)
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    rng = generator(loader.seed, loader.epoch, STREAM_AUGMENT, loader.rank)
    out = []
    for positions in loader.position_batches():
        if loader.augment:
            offsets, flips = draw_crop_flip(len(positions), CIFAR_PADDING, rng)
            batch = crop_flip_nhwc(pixels, positions, offsets, flips, CIFAR_PADDING)
        else:
            batch = pixels[positions]
        out.append((normalize_nhwc(batch, mean_t, std_t), targets[positions]))
    return out


def assert_same_batches(got, expected) -> None:
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.dtype == ex.dtype and y.dtype == ey.dtype
        assert torch.equal(x.cpu(), ex) and torch.equal(y.cpu(), ey)


def random_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


@pytest.mark.parametrize("resident", [True, False], ids=["gpu-way", "host-way"])
@pytest.mark.parametrize("train, augment", [(True, True), (True, False), (False, False)])
def test_array_loader_equals_the_per_batch_loop_for_two_epochs_and_two_seeds(resident, train, augment):
    images, labels = random_set(203)  # 203 = 6 x 32 + 11: a short last batch
    for seed in (0, 7):
        loader = ArrayLoader(images, labels, 32, train=train, augment=augment, seed=seed, mean=MEAN, std=STD, device=torch.device("cpu"), resident=resident)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            assert_same_batches(list(loader), reference_batches(images, labels, loader))


def test_ranks_of_the_gpu_way_equal_the_per_batch_loop_and_drop_a_single_last_image():
    images, labels = random_set(65)  # 65 = 2 x 32 + 1: training drops the trailing single image
    common = dict(train=True, augment=True, seed=3, mean=MEAN, std=STD, device=torch.device("cpu"), world_size=2)
    for rank in (0, 1):
        loader = ArrayLoader(images, labels, 16, rank=rank, **common)
        loader.set_epoch(4)
        assert_same_batches(list(loader), reference_batches(images, labels, loader))
    alone = ArrayLoader(images, labels, 32, **{**common, "world_size": 1})
    assert [len(y) for _, y in alone] == [32, 32]


def test_epoch_plan_is_drawn_on_the_cpu_and_replays_per_epoch():
    images, labels = random_set(40)
    loader = ArrayLoader(images, labels, 16, train=True, augment=True, seed=1, mean=MEAN, std=STD, device=torch.device("cpu"))
    plan, sizes = loader.epoch_plan()
    assert plan.device.type == "cpu" and plan.dtype == torch.int64 and plan.shape == (40, 4) and sizes == [16, 16, 8]
    assert sorted(plan[:, 0].tolist()) == list(range(40))
    assert plan[:, 1:3].min() >= 0 and plan[:, 1:3].max() <= 2 * CIFAR_PADDING and set(plan[:, 3].tolist()) <= {0, 1}
    assert torch.equal(plan, loader.epoch_plan()[0])
    loader.set_epoch(1)
    assert not torch.equal(plan, loader.epoch_plan()[0])


def test_digits_bundle_gpu_loader_equals_torch_loader():
    kinds = {}
    for loader in ("gpu", "torch"):
        data = make_data("digits", batch_size=50, seed=2, train_subset=230, test_subset=70, loader=loader)
        data.set_epoch(1)
        kinds[loader] = ([b for b in data.train], [b for b in data.test], data.info["loader"])
    assert kinds["gpu"][2].startswith("gpu (uint8 arrays resident on cpu")
    assert kinds["torch"][2].startswith("torch (in-memory uint8 arrays on the host")
    assert_same_batches(kinds["gpu"][0], kinds["torch"][0])
    assert_same_batches(kinds["gpu"][1], kinds["torch"][1])


def test_cifar10_bundle_gpu_loader_equals_the_per_batch_loop(cifar10_tar):
    """Real CIFAR-10 images (a small subset), augmented: two epochs, two seeds."""
    for seed in (0, 1):
        data = make_data("cifar10", data_dir=cifar10_tar, batch_size=64, seed=seed, train_subset=200, test_subset=40, loader="gpu")
        images, labels = data.train.images, data.train.labels  # padded on the device (here: the CPU)
        raw = images[:, CIFAR_PADDING:-CIFAR_PADDING, CIFAR_PADDING:-CIFAR_PADDING].numpy()
        for epoch in (0, 1):
            data.set_epoch(epoch)
            expected = reference_batches(raw, labels.numpy(), data.train, tuple(data.info["mean"]), tuple(data.info["std"]))
            assert_same_batches(list(data.train), expected)


def test_loader_choice_for_each_device_and_data_set(tmp_path: Path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _choose_backend("cifar10", "auto", None, cuda) == "gpu"
    assert _choose_backend("digits", "auto", None, cuda) == "gpu"
    assert _choose_backend("cifar10", "auto", None, cpu) == "torch"
    assert _choose_backend("imagenet", "auto", tmp_path, cuda) == "torch"  # no .beton files there
    assert _choose_backend("cifar10", "gpu", None, cpu) == "gpu"  # the same batches on the CPU: allowed
    with pytest.raises(DataError, match=r"loader='gpu' .* serves cifar10 and digits, not 'imagenet'; use loader='ffcv'"):
        _choose_backend("imagenet", "gpu", None, cuda)
    with pytest.raises(DataError, match=r"one of auto, torch, gpu, ffcv"):
        _choose_backend("cifar10", "fast", None, cuda)


@pytest.mark.cuda
def test_cuda_loader_equals_the_cpu_loader_without_host_syncs():
    """On a GPU: the resident loader and the host loader give the CPU loader's pixels exactly (and
    its normalised batches to float rounding), and iterating the resident one never waits for the
    device (CUDA sync debug mode raises on a synchronising call)."""
    images, labels = random_set(1000, seed=5)
    common = dict(train=True, augment=True, seed=4)
    for mean, std, exact in ((IDENTITY_MEAN, IDENTITY_STD, True), (MEAN, STD, False)):
        cpu = ArrayLoader(images, labels, 128, mean=mean, std=std, device=torch.device("cpu"), **common)
        on_gpu = ArrayLoader(images, labels, 128, mean=mean, std=std, device=torch.device("cuda"), resident=True, **common)
        via_host = ArrayLoader(images, labels, 128, mean=mean, std=std, device=torch.device("cuda"), resident=False, **common)
        for epoch in (0, 1):
            for loader in (cpu, on_gpu, via_host):
                loader.set_epoch(epoch)
            expected = list(cpu)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                resident_batches = list(on_gpu)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            for got in (resident_batches, list(via_host)):
                assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in got)
                if exact:
                    assert_same_batches(got, expected)
                else:
                    for (x, y), (ex, ey) in zip(got, expected, strict=True):
                        torch.testing.assert_close(x.cpu(), ex, rtol=0, atol=1e-5)
                        assert torch.equal(y.cpu(), ey)
