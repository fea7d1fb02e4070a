"""bnnbench.data: digits, CIFAR-10 (tar, folder, pickles), ImageNet folders, subsets, determinism, errors."""

from __future__ import annotations

import io
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import transforms as T

from bnnbench.data import (
    BadImageError,
    DataError,
    DataNotFoundError,
    balanced_order,
    balanced_subset,
    make_data,
)
from bnnbench.data.cifar import load_cifar10
from bnnbench.data.loaders import ArrayLoader
from bnnbench.data.sampling import batch_slices, shard
from bnnbench.data.sources import TarSource
from bnnbench.data.transforms import (
    crop_flip_nhwc,
    draw_crop_flip,
    normalize_nhwc,
    pad_nhwc,
    random_resized_crop_box,
)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


pytestmark = pytest.mark.usefixtures("private_cache")  # decode caches of these tests never reach the user's cache


def write_jpeg(path: Path, rng: np.random.Generator, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


# ---------------------------------------------------------------- digits


def test_digits_bundle_shapes_split_and_normalisation():
    bundle = make_data("digits", batch_size=100, seed=3)
    assert (bundle.num_classes, bundle.family, bundle.train_size, bundle.test_size) == (10, "cifar", 1438, 359)
    assert len(bundle.train) == 15 and len(bundle.test) == 4  # 1438 = 14*100 + 38; 359 = 3*100 + 59
    x, y = next(iter(bundle.train))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert bundle.info["augment"] is False  # CIFAR augmentation is off for digits even when asked for
    train_x = torch.cat([x for x, _ in bundle.train])
    assert abs(train_x.mean().item()) < 1e-3 and abs(train_x.std().item() - 1) < 1e-3  # its own statistics
    test_labels = torch.cat([y for _, y in bundle.test])
    assert torch.bincount(test_labels).tolist() == [36] * 9 + [35]
    json.dumps(bundle.info)


def test_digits_train_and_test_are_disjoint_and_upsampled_from_8x8():
    from sklearn.datasets import load_digits

    bundle = make_data("digits", batch_size=2000, augment=False)
    train_px = bundle.train.images[:, :, :, 0].reshape(len(bundle.train.images), -1)
    test_px = bundle.test.images[:, :, :, 0].reshape(len(bundle.test.images), -1)
    assert not (train_px[:, None, :] == test_px[None, :, :]).all(-1).any()  # no test image in the train split
    digits = load_digits()
    raw = torch.from_numpy(digits.images.astype(np.float32) * (255 / 16)).unsqueeze(1)
    upsampled = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False).round().flatten(1)
    # every test image is exactly one of the 1,797 originals upsampled, and carries that original's label
    dist = torch.cdist(test_px.float(), upsampled, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(1).values.max() == 0
    assert torch.equal(torch.from_numpy(digits.target[dist.argmin(1).numpy()]), bundle.test.labels)
    # and the 8x8 structure survives: shrunk back, each is nearest to an original of its own class
    small = F.interpolate(bundle.test.images[..., :1].permute(0, 3, 1, 2).float(), size=(8, 8), mode="area").flatten(1)
    nearest = torch.cdist(small, raw.flatten(1)).argmin(1)
    assert (torch.from_numpy(digits.target[nearest.numpy()]) == bundle.test.labels).float().mean() > 0.95


# ---------------------------------------------------------------- subsets and sharding


def test_balanced_order_prefixes_are_class_balanced():
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 5])
    order = balanced_order(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert np.bincount(labels[order[:50]]).tolist() == [5] * 10
    # class 9 runs out after 5 rounds; the round-robin goes on over the other 9 classes
    assert np.bincount(labels[order[:100]]).tolist() == [11] * 5 + [10] * 4 + [5]
    assert np.bincount(labels[order[:104]]).tolist() == [11] * 9 + [5]
    uneven = np.repeat(np.arange(10), np.arange(20, 120, 10))
    assert np.bincount(uneven[balanced_order(uneven)[:100]]).tolist() == [10] * 10
    subset = balanced_subset(labels, 100)
    assert np.all(np.diff(subset) > 0) and np.array_equal(subset, np.sort(order[:100]))
    assert np.array_equal(balanced_subset(labels, 100), subset)  # fixed: not tied to a run seed
    assert not np.array_equal(balanced_order(labels, seed=1)[:100], order[:100])
    with pytest.raises(DataError, match="only 815"):
        balanced_subset(labels, 10_000)


def test_shard_matches_distributed_sampler():
    for n, world in ((10, 3), (12, 4), (7, 2), (2, 3)):
        for rank in range(world):
            expected = list(DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=False))
            assert shard(torch.arange(n), rank, world).tolist() == expected


def test_ranks_split_one_epoch_between_them_like_distributed_sampler():
    images = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(10)
    common = dict(train=True, augment=False, seed=2, mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"), world_size=3)
    ranks = [ArrayLoader(images, labels, 2, rank=r, **common) for r in range(3)]
    for loader in ranks:
        loader.set_epoch(5)
    seen = [torch.cat([y for _, y in loader]).tolist() for loader in ranks]
    assert [len(s) for s in seen] == [4, 4, 4] and [len(loader) for loader in ranks] == [2, 2, 2]
    assert sorted(sum(seen, [])) == sorted(list(range(10)) + [seen[0][0], seen[1][0]])  # 2 repeats pad 10 to 12


def test_distributed_needs_a_process_group_and_reads_its_rank(tmp_path):
    import torch.distributed as dist

    with pytest.raises(DataError, match="init_process_group"):
        make_data("digits", distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bundle = make_data("digits", distributed=True, train_subset=100)
        assert bundle.info["distributed"] == {"rank": 0, "world_size": 1} and bundle.train.num_samples == 100
    finally:
        dist.destroy_process_group()


def test_batch_plan_drops_only_a_trailing_single_image_in_training():
    assert [s.stop - s.start for s in batch_slices(257, 128, drop_single=True)] == [128, 128]
    assert [s.stop - s.start for s in batch_slices(257, 128, drop_single=False)] == [128, 128, 1]
    assert [s.stop - s.start for s in batch_slices(300, 128, drop_single=True)] == [128, 128, 44]


# ---------------------------------------------------------------- augmentation and normalisation


def test_crop_flip_matches_per_image_pad_crop_flip():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    offsets, flips = draw_crop_flip(64, 4, g)
    index = torch.randperm(64)
    out = crop_flip_nhwc(pad_nhwc(images, 4), index, offsets, flips, 4)
    assert 10 < flips.sum() < 54 and len(set(map(tuple, offsets.tolist()))) > 20
    for row, i in enumerate(index.tolist()):
        padded = F.pad(images[i], (0, 0, 4, 4, 4, 4))  # zero fill, as RandomCrop(32, padding=4)
        crop = padded[offsets[row, 0] : offsets[row, 0] + 32, offsets[row, 1] : offsets[row, 1] + 32]
        assert torch.equal(out[row], crop.flip(1) if flips[row] else crop)


def test_normalize_matches_torchvision_to_tensor_normalize():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ours = normalize_nhwc(images, torch.tensor(mean), torch.tensor(std))
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    theirs = torch.stack([reference(Image.fromarray(img.numpy())) for img in images])
    assert ours.is_contiguous() and torch.allclose(ours, theirs, atol=1e-5)


def test_random_resized_crop_box_stays_inside_with_valid_area_and_aspect():
    rng = np.random.default_rng(0)
    for height, width in ((375, 500), (64, 48), (30, 400)):
        for _ in range(200):
            top, left, h, w = random_resized_crop_box(rng, height, width)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
            if (height, width) != (30, 400):
                assert 0.07 <= h * w / (height * width) <= 1.0 and 0.7 <= w / h <= 1.4
    # a 30x400 strip admits no crop with aspect <= 4/3 and area >= 8%: the centred fallback
    assert random_resized_crop_box(np.random.default_rng(1), 30, 400) == (0, 180, 30, 40)


def test_vectorised_cifar_path_is_faster_than_per_image_pil_transforms():
    """Same work (crop, flip, normalise 2,048 images), timed on one thread in this process.

    One thread: on a busy shared machine torch's intra-op threads wait for a free core at every
    parallel op, which measures the scheduler rather than the work.
    """
    images = torch.randint(0, 256, (2048, 32, 32, 3), dtype=torch.uint8)
    labels = torch.zeros(2048, dtype=torch.int64)
    fast = ArrayLoader(
        images.numpy(),
        labels.numpy(),
        128,
        train=True,
        augment=True,
        seed=0,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        device=torch.device("cpu"),
    )
    pil_images = [Image.fromarray(img.numpy()) for img in images]
    per_image = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)]
    )

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_fast = best_of(lambda: [x for x, _ in fast])
        t_pil = best_of(lambda: [torch.stack([per_image(im) for im in pil_images[i : i + 128]]) for i in range(0, 2048, 128)])
    finally:
        torch.set_num_threads(threads)
    assert t_pil / t_fast > 3, f"vectorised {t_fast:.3f}s vs per-image PIL {t_pil:.3f}s"


# ---------------------------------------------------------------- determinism


def test_same_seed_and_epoch_replay_bit_identical_batches_independent_of_global_rng():
    a = make_data("digits", batch_size=64, seed=5, train_subset=300)
    b = make_data("digits", batch_size=64, seed=5, train_subset=300)
    a.set_epoch(3)
    b.set_epoch(3)
    torch.manual_seed(1)
    first = batches(a.train)
    torch.manual_seed(2)
    np.random.seed(2)
    assert same_batches(first, batches(b.train))
    assert same_batches(first, batches(a.train))  # re-iterating the same epoch replays it
    a.set_epoch(4)
    other_epoch = batches(a.train)
    assert not torch.equal(first[0][1], other_epoch[0][1])  # a different order
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(torch.cat([y for _, y in other_epoch]).tolist())
    c = make_data("digits", batch_size=64, seed=6, train_subset=300)
    c.set_epoch(3)
    assert not torch.equal(first[0][1], next(iter(c.train))[1])


def test_cifar_augmentation_is_seeded_per_epoch(cifar10_tar):
    kwargs = dict(data_dir=cifar10_tar, batch_size=50, train_subset=100, test_subset=50, seed=0)
    a, b = make_data("cifar10", **kwargs), make_data("cifar10", **kwargs, augment=False)
    for bundle in (a, b):
        bundle.set_epoch(2)
    aug, plain = batches(a.train), batches(b.train)
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(aug, plain, strict=True))  # same order, augmentation on top
    assert not torch.equal(aug[0][0], plain[0][0])
    a2 = make_data("cifar10", **kwargs)
    a2.set_epoch(2)
    assert same_batches(aug, batches(a2.train))
    assert same_batches(batches(a.test), batches(b.test))  # evaluation is never augmented


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_from_tar_subsets_labels_and_provenance(cifar10_tar):
    bundle = make_data("cifar10", data_dir=cifar10_tar, batch_size=64, train_subset=200, test_subset=100)
    assert (bundle.train_size, bundle.test_size, bundle.num_classes, bundle.family) == (200, 100, 10, "cifar")
    assert bundle.classes == CIFAR_CLASSES
    labels = torch.cat([y for _, y in bundle.train])
    assert torch.bincount(labels).tolist() == [20] * 10
    assert torch.bincount(torch.cat([y for _, y in bundle.test])).tolist() == [10] * 10
    info = bundle.info
    assert info["md5"] == "63ef9f0d0f37ee9d39df1f47bfeb8eb8" and info["note"] == "CIFAR-10 (JPEG q75 copy)"
    assert (info["layout"], info["full_train_size"], info["full_test_size"]) == ("tar", 50000, 10000)
    assert info["decode_cache"] == {"train": None, "test": None}  # a subset alone decodes only its images
    json.dumps(info)


def test_cifar10_pixels_and_labels_come_from_the_named_files(cifar10_tar):
    loaded = load_cifar10(cifar10_tar, train_subset=40, test_subset=30, skip_bad_images=False, download=False)
    source = TarSource(cifar10_tar)
    index = source.split_index("test", CIFAR_CLASSES)
    chosen = balanced_subset(index.labels, 30)
    for row in (0, 7, 29):
        name = index.names[chosen[row]]
        assert name.startswith("test/") and CIFAR_CLASSES[loaded.test.labels[row]] == name.split("/")[-2]
        pil = np.asarray(Image.open(io.BytesIO(source.read(name))).convert("RGB"))
        assert np.array_equal(loaded.test.images[row], pil)


def test_cifar10_tar_and_extracted_folder_give_identical_batches(cifar10_tar, cifar10_dir):
    kwargs = dict(batch_size=64, train_subset=150, test_subset=60, seed=1)
    from_tar = make_data("cifar10", data_dir=cifar10_tar, **kwargs)
    from_dir = make_data("cifar10", data_dir=cifar10_dir, **kwargs)
    assert from_dir.info["layout"] == "image-folder" and from_dir.info["note"] == "CIFAR-10 (JPEG q75 copy)"
    for bundle in (from_tar, from_dir):
        bundle.set_epoch(1)
    assert same_batches(batches(from_tar.train), batches(from_dir.train))
    assert same_batches(batches(from_tar.test), batches(from_dir.test))


def test_cifar10_torchvision_pickle_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    raw = {}
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        raw[name] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(raw[name]))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES}))
    bundle = make_data("cifar10", data_dir=tmp_path, batch_size=32, augment=False)
    assert (bundle.train_size, bundle.test_size, bundle.info["layout"]) == (20, 6, "torchvision-pickle")
    x, y = next(iter(bundle.test))
    expected = normalize_nhwc(
        torch.from_numpy(raw["test_batch"]["data"].reshape(6, 3, 32, 32).transpose(0, 2, 3, 1).copy()),
        torch.tensor(bundle.info["mean"]),
        torch.tensor(bundle.info["std"]),
    )
    assert torch.equal(x, expected) and y.tolist() == raw["test_batch"]["labels"]


def test_decode_cache_is_built_once_and_keyed_by_the_files(tmp_path, monkeypatch, make_image_folder):
    root = make_image_folder(tmp_path / "c10", {"train": {"a": 5, "b": 5}, "test": {"a": 2, "b": 2}})
    first = make_data("cifar10", data_dir=root, batch_size=4)
    cache = Path(first.info["decode_cache"]["train"])
    assert (cache / "images.npy").is_file() and json.loads((cache / "meta.json").read_text())["full_size"] == 10
    second = make_data("cifar10", data_dir=root, batch_size=4)
    assert second.info["decode_cache"] == first.info["decode_cache"]
    assert same_batches(batches(first.train), batches(second.train))
    write_jpeg(root / "train" / "a" / "0000.jpg", np.random.default_rng(9), 32, 32)  # edit one image
    third = make_data("cifar10", data_dir=root, batch_size=4)
    assert third.info["decode_cache"]["train"] != first.info["decode_cache"]["train"]
    assert third.info["decode_cache"]["test"] == first.info["decode_cache"]["test"]
    # a subset read from the cache is the subset decoded directly from the files
    cached = load_cifar10(root, train_subset=6, test_subset=2, skip_bad_images=False, download=False)
    monkeypatch.setenv("BNNBENCH_CACHE", str(tmp_path / "fresh-cache"))
    direct = load_cifar10(root, train_subset=6, test_subset=2, skip_bad_images=False, download=False)
    assert cached.train.cache is not None and direct.train.cache is None
    assert np.array_equal(cached.train.images, direct.train.images) and np.array_equal(cached.train.labels, direct.train.labels)


# ---------------------------------------------------------------- ImageNet


@pytest.fixture
def imagenet_dir(tmp_path, make_image_folder) -> Path:
    return make_image_folder(
        tmp_path / "imagenet", {"train": {"n01": 4, "n02": 4, "n03": 4}, "val": {"n01": 2, "n03": 2}}, size=None
    )


def test_imagenet_folder_path(imagenet_dir):
    bundle = make_data("imagenet", data_dir=imagenet_dir, batch_size=5, eval_batch_size=3)
    assert (bundle.num_classes, bundle.family, bundle.train_size, bundle.test_size) == (3, "imagenet", 12, 4)
    assert bundle.classes == ["n01", "n02", "n03"] and len(bundle.train) == 3 and len(bundle.test) == 2
    x, y = next(iter(bundle.train))
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    # val lacks n02: its n03 images keep label 2 (labels follow the training split's class names)
    assert torch.cat([y for _, y in bundle.test]).tolist() == [0, 0, 2, 2]
    assert sorted(torch.cat([y for _, y in bundle.train]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_imagenet_eval_is_resize_256_centre_crop_224(imagenet_dir):
    bundle = make_data("imagenet", data_dir=imagenet_dir, batch_size=4)
    x, _ = next(iter(bundle.test))
    path = imagenet_dir / "val" / "n01" / "0000.jpg"
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(bundle.info["mean"], bundle.info["std"])])
    expected = reference(Image.open(path).convert("RGB"))
    assert (x[0] - expected).abs().mean() < 0.02  # tensor vs PIL antialiased resize differ by rounding only


def test_imagenet_augmentation_is_seeded_per_image_whatever_the_workers(imagenet_dir):
    a = make_data("imagenet", data_dir=imagenet_dir, batch_size=4, seed=3, workers=0)
    b = make_data("imagenet", data_dir=imagenet_dir, batch_size=4, seed=3, workers=2)
    a.set_epoch(1)
    b.set_epoch(1)
    first = batches(a.train)
    assert same_batches(first, batches(b.train))
    a.set_epoch(2)
    assert not same_batches(first, batches(a.train))


# ---------------------------------------------------------------- bad input


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"not an image at all" * 20)


@pytest.mark.parametrize("subset", [None, 8], ids=["cache-build", "subset"])
def test_corrupt_cifar_image_is_named_or_skipped_and_counted(tmp_path, subset, make_image_folder):
    root = make_image_folder(tmp_path / "c10", {"train": {"a": 5, "b": 5}, "test": {"a": 2, "b": 2}})
    bad = root / "train" / "b" / "0001.jpg"
    corrupt(bad, "truncate")
    with pytest.raises(BadImageError, match=str(bad)) as err:
        make_data("cifar10", data_dir=root, train_subset=subset)
    assert "truncated" in str(err.value) and "skip_bad_images" in str(err.value)
    bundle = make_data("cifar10", data_dir=root, train_subset=subset, skip_bad_images=True)
    assert bundle.info["skipped_bad_images"] == 1 and bundle.info["skipped_images"] == [str(bad)]
    assert bundle.train.skipped_images == {str(bad)} and not bundle.test.skipped_images
    expected = 9 if subset is None else 7
    assert bundle.train_size == expected == len(torch.cat([y for _, y in bundle.train]))
    with pytest.raises(BadImageError, match=str(bad)):  # a cache built while skipping does not hide the file later
        make_data("cifar10", data_dir=root, train_subset=subset)


def test_corrupt_imagenet_image_is_named_or_skipped_and_counted(imagenet_dir):
    bad = imagenet_dir / "val" / "n03" / "0001.jpg"
    corrupt(bad, "garbage")
    strict = make_data("imagenet", data_dir=imagenet_dir, batch_size=4, workers=2)
    with pytest.raises(BadImageError, match=str(bad)):
        list(strict.test)
    lenient = make_data("imagenet", data_dir=imagenet_dir, batch_size=4, skip_bad_images=True)
    labels = torch.cat([y for _, y in lenient.test])
    assert labels.tolist() == [0, 0, 2] and lenient.test.skipped_images == {str(bad)}


def test_cifar_image_of_the_wrong_size_is_an_error_naming_it(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "c10", {"train": {"a": 2}, "test": {"a": 1}})
    write_jpeg(root / "train" / "a" / "0001.jpg", np.random.default_rng(0), 40, 32)
    with pytest.raises(DataError, match=r"0001\.jpg is 32x40, expected 32x32"):
        make_data("cifar10", data_dir=root)


def test_test_split_class_missing_from_train_is_an_error(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "c10", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "c": 1}})
    with pytest.raises(DataError, match=r"\['c'\] that the training split does not have"):
        make_data("cifar10", data_dir=root)


def test_missing_data_errors_say_where_they_looked_and_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        make_data("cifar10", data_dir=tmp_path / "nowhere")
    monkeypatch.setenv("BNNBENCH_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataNotFoundError) as err:
        make_data("cifar10")
    message = str(err.value)
    assert (
        str(tmp_path / "empty-cache" / "cifar-10-batches-py") in message and "data_dir" in message and "download=True" in message
    )
    (tmp_path / "in" / "train" / "n01").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="looked for train/ and val/"):
        make_data("imagenet", data_dir=tmp_path / "in")
    (tmp_path / "odd").mkdir()
    with pytest.raises(DataError, match="not a CIFAR-10 copy"):
        make_data("cifar10", data_dir=tmp_path / "odd")


def test_unknown_dataset_and_loader_errors():
    with pytest.raises(DataError, match="unknown data set 'mnist'"):
        make_data("mnist")
    with pytest.raises(DataError, match="loader must be one of"):
        make_data("digits", loader="dali")
    with pytest.raises(DataError, match="not 'digits'"):
        make_data("digits", loader="ffcv")
