"""Shared fixtures: the CIFAR-10 JPEG copy, as a tar and extracted once into the bnnbench cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnnbench.data import extract_archive
from bnnbench.data.cache import cache_root

# The shared CIFAR-10 JPEG copy: $BNNBENCH_CIFAR10_TAR, else ../shared/data next to the repository,
# else the workplace's /work/shared/data (where a clone elsewhere, such as CI's, still finds it).
_TAR_CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar",
    Path("/work/shared/data/cifar10-jpeg.tar"),
]
CIFAR10_TAR = Path(
    os.environ.get("BNNBENCH_CIFAR10_TAR") or next((p for p in _TAR_CANDIDATES if p.is_file()), _TAR_CANDIDATES[0])
)
# The cache of the session (read before any test points BNNBENCH_CACHE at a private folder), so the
# extraction is shared by every test and kept for later sessions.
SESSION_CACHE = cache_root()


@pytest.fixture(scope="session")
def cifar10_tar() -> Path:
    """Path of the CIFAR-10 JPEG tar; the test is skipped (with the reason) when it is absent."""
    if not CIFAR10_TAR.is_file():
        pytest.skip(f"CIFAR-10 tar not found at {CIFAR10_TAR} (set BNNBENCH_CIFAR10_TAR to its path)")
    return CIFAR10_TAR


@pytest.fixture(scope="session")
def cifar10_dir(cifar10_tar: Path) -> Path:
    """The tar extracted ONCE into ``<cache>/extracted/cifar10-jpeg-<md5>/`` (train/<class>/, test/<class>/),
    ``<cache>`` being ``$BNNBENCH_CACHE`` or ``~/.cache/bnnbench`` as set when the session starts.

    Later sessions reuse the extracted folder.  Pass it as ``data_dir`` with small
    ``train_subset``/``test_subset``: only the chosen images are decoded.
    """
    return extract_archive(cifar10_tar, SESSION_CACHE)


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """Point ``BNNBENCH_CACHE`` at a fresh folder for one test module (decode caches, tar indexes).

    Opt in with ``pytestmark = pytest.mark.usefixtures("private_cache")``.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BNNBENCH_CACHE", str(tmp_path_factory.mktemp("bnnbench-cache")))
        yield


def _write_image(path: Path, rng: np.random.Generator, height: int, width: int, smooth: bool) -> None:
    """A random RGB JPEG: noise, or a smooth colour gradient (which survives resampling)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if smooth:
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        corners = rng.uniform(0, 255, (3, 3))
        pixels = corners[0] + corners[1] * y[..., None] + corners[2] * x[..., None]
        pixels = np.clip(pixels * 0.5, 0, 255).astype(np.uint8)
    else:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture
def make_image_folder():
    """Builder of ``root/<split>/<class>/NNNN.jpg`` folders of generated JPEGs.

    ``make_image_folder(root, {"train": {"cat": 4}, "val": {"cat": 2}}, size=(32, 32))``; ``size=None``
    draws each image's height and width in [40, 100); ``smooth=True`` draws gradients, not noise.
    """

    def build(
        root: Path,
        splits: dict[str, dict[str, int]],
        size: tuple[int, int] | None = (32, 32),
        seed: int = 0,
        smooth: bool = False,
    ) -> Path:
        rng = np.random.default_rng(seed)
        for split, counts in splits.items():
            for cls, n in counts.items():
                for i in range(n):
                    h, w = size if size else rng.integers(40, 100, 2)
                    _write_image(root / split / cls / f"{i:04d}.jpg", rng, int(h), int(w), smooth)
        return root

    return build


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test runs torch on one intra-op thread: the tensors are small, results are then
    independent of the machine's core count, and two spinning OpenMP threads per process thrash
    when the 2 cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def threads(monkeypatch):
    """``threads(n)`` sets torch's thread count for the rest of the test (restored after it), and omp splits any
    amount of work between them (``omp.PARALLEL_WORK`` 1): a kernel's multi-threaded path on small tensors."""
    import torch

    from bnnbench import omp

    previous = torch.get_num_threads()
    monkeypatch.setattr(omp, "PARALLEL_WORK", 1)
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU: without one they are skipped, saying so
    (``scripts/gpu-check`` runs them on a GPU machine: ``pytest -m cuda``)."""
    cuda_tests = [item for item in items if "cuda" in item.keywords]
    if not cuda_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); scripts/gpu-check runs these with pytest -m cuda")
    for item in cuda_tests:
        item.add_marker(skip)
