"""Where encoded images come from: an image folder or an (uncompressed) tar of one.

Both layouts are ``<split>/<class>/<file>`` (the tar may add a common top folder).  Classes are
the sorted class-folder names of the training split; every other split is labelled through that
same name -> index map, so a split that lacks a class can never shift the labels of the others.
Samples are sorted by (class, path), so a tar and its extracted folder list the same images in
the same order.

A tar must be complete: its last member followed by the end-of-archive marker (two zero blocks).
A tar cut short (an interrupted copy or download) is refused naming the file, never read up to the
cut, so no cache entry is ever made from part of an archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import read_json, write_bytes, write_json
from .cache import (
    KNOWN_ARCHIVES,
    atomic_directory,
    cache_root,
    file_md5,
    writable_cache,
)
from .errors import BadImageError, DataError, DataNotFoundError
from .images import is_image_name

SOURCE_MARKER = ".bnnbench-source.json"  # written into folders extracted by extract_archive()
END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)
CUT_SHORT_ERRORS = ("unexpected end of data", "truncated header")  # tarfile's words for a tar that stops early
MEMBER_INDEX_VERSION = 2  # version 1 indexes were written without checking that the tar is complete


@dataclass(frozen=True)
class SplitIndex:
    """The image files of one split: ``names`` (paths inside the source), int64 ``labels``, ``classes``."""

    split: str
    names: list[str]
    labels: np.ndarray
    classes: list[str]


def _index_from_entries(split: str, entries: list[tuple[str, str]], classes: list[str] | None, where: str) -> SplitIndex:
    """Sort (class, name) pairs and label them; ``classes=None`` means this split defines the classes."""
    if not entries:
        raise DataError(f"no images in {where}: expected {split}/<class>/<image> with one of the image extensions")
    found = sorted({cls for cls, _ in entries})
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{where} has class folders {unknown[:5]} that the training split does not have; "
            "every split must use the training split's class names"
        )
    to_label = {cls: i for i, cls in enumerate(classes)}
    entries = sorted(entries, key=lambda e: (to_label[e[0]], e[1]))
    labels = np.fromiter((to_label[cls] for cls, _ in entries), dtype=np.int64, count=len(entries))
    return SplitIndex(split, [name for _, name in entries], labels, list(classes))


class FolderSource:
    """Images in ``root/<split>/<class>/**/<file>``."""

    kind = "image-folder"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        marker = self.root / SOURCE_MARKER
        self.md5: str | None = read_json(marker).get("md5") if marker.is_file() else None

    def split_index(self, split: str, classes: list[str] | None = None) -> SplitIndex:
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataNotFoundError(f"no {split}/ folder in {self.root}: expected {self.root}/{split}/<class>/<image>")
        class_dirs = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
        if not class_dirs:
            loose = [e.name for e in os.scandir(split_dir) if e.is_file() and is_image_name(e.name)]
            hint = " (it holds images directly: sort them into one folder per class)" if loose else ""
            raise DataError(f"{split_dir} has no class folders{hint}; expected {split_dir}/<class>/<image>")
        entries = []
        for cls in class_dirs:
            files = [
                os.path.relpath(os.path.join(dirpath, f), self.root)
                for dirpath, _, filenames in os.walk(split_dir / cls, followlinks=True)
                for f in filenames
                if is_image_name(f)
            ]
            if not files:
                raise DataError(
                    f"class folder {split_dir / cls} has no images (extensions: jpg, jpeg, png, ppm, bmp, pgm, tif, tiff, webp)"
                )
            entries.extend((cls, name) for name in files)
        return _index_from_entries(split, entries, classes, str(split_dir))

    def fingerprint(self, index: SplitIndex) -> str:
        """sha1 of (name, size, mtime) of every file: changes when any image is added, removed or edited."""
        digest = hashlib.sha1(str(self.root.resolve()).encode())
        for name in index.names:
            st = os.stat(self.root / name)
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as exc:
            raise BadImageError(self.display(name), f"cannot read the file ({exc.strerror})") from None

    def display(self, name: str) -> str:
        return str(self.root / name)


class TarSource:
    """Images inside an uncompressed tar, read in place (no extraction) through a cached member index."""

    kind = "tar"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.md5 = file_md5(self.path)
        self._names, self._offsets, self._sizes = self._member_index()
        self._position = {name: i for i, name in enumerate(self._names)}
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")  # keeps no open file object

    def _member_index(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(names, data offsets, sizes) of the image members of the complete tar, cached by md5
        (parsing 60k headers takes seconds)."""
        cached = cache_root() / "archives" / f"{self.md5}-members-v{MEMBER_INDEX_VERSION}.npz"
        if not cached.is_file():
            names, offsets, sizes = [], [], []
            with open_complete_tar(self.path) as tf:
                for member in tf.getmembers():
                    if member.isfile() and is_image_name(member.name):
                        names.append(member.name.removeprefix("./"))
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
            writable_cache(cached)
            buf = io.BytesIO()
            np.savez(
                buf,
                names=np.array(names, dtype=str),
                offsets=np.array(offsets, dtype=np.int64),
                sizes=np.array(sizes, dtype=np.int64),
            )
            write_bytes(cached, buf.getvalue())
        with np.load(cached, allow_pickle=False) as z:
            return z["names"].tolist(), z["offsets"], z["sizes"]

    def split_index(self, split: str, classes: list[str] | None = None) -> SplitIndex:
        entries, prefixes = [], set()
        for name in self._names:
            parts = name.split("/")
            for i in range(len(parts) - 2):
                if parts[i] == split:
                    prefixes.add("/".join(parts[:i]))
                    entries.append((parts[i + 1], name))
                    break
        if len(prefixes) > 1:
            raise DataError(f"{self.path} holds several {split}/ folders ({sorted(prefixes)[:3]}); expected one")
        if not entries:
            raise DataNotFoundError(f"no {split}/<class>/<image> members in {self.path}")
        return _index_from_entries(split, entries, classes, f"{self.path}:{split}/")

    def fingerprint(self, index: SplitIndex) -> str:
        return self.md5

    def read(self, name: str) -> bytes:
        i = self._position[name]
        start = int(self._offsets[i])
        return self._map[start : start + int(self._sizes[i])].tobytes()

    def display(self, name: str) -> str:
        return f"{self.path}:{name}"


@contextlib.contextmanager
def open_complete_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """The uncompressed tar ``path``, opened and its members read, once checked to be complete.

    tarfile stops quietly at a header cut short or at the end of the file, so the check is ours: the
    position after the last member must hold the end-of-archive marker.
    """
    try:
        with tarfile.open(path, "r:") as tf:
            members = tf.getmembers()
            with open(path, "rb") as f:
                f.seek(tf.offset)  # where tarfile stopped reading: the end of the last member
                if f.read(len(END_OF_ARCHIVE)) != END_OF_ARCHIVE:
                    last = f", after its last whole member {members[-1].name}" if members else ""
                    raise _cut_short(path, f"no end-of-archive marker at byte {tf.offset}{last}")
            yield tf
    except tarfile.ReadError as exc:
        if str(exc) in CUT_SHORT_ERRORS:
            raise _cut_short(path, str(exc)) from None
        raise DataError(f"{path} is not an uncompressed tar ({exc}); extract it and pass the folder") from None


def _cut_short(path: Path, detail: str) -> DataError:
    """The error for a tar that ends before its end-of-archive marker."""
    return DataError(
        f"{path} is incomplete ({detail}; the file has {os.path.getsize(path)} bytes): it was cut short, "
        "e.g. by an interrupted copy or download. Copy it again"
    )


def open_source(path: Path) -> FolderSource | TarSource:
    """A :class:`TarSource` for a ``.tar`` file, else a :class:`FolderSource`."""
    return TarSource(path) if Path(path).is_file() else FolderSource(path)


def archive_note(md5: str | None) -> str | None:
    """The note that must accompany numbers measured on a known archive (e.g. the JPEG copy of CIFAR-10)."""
    return KNOWN_ARCHIVES.get(md5) if md5 else None


def extract_archive(tar_path: Path, cache: Path | None = None) -> Path:
    """Extract ``tar_path`` once into ``<cache>/extracted/<stem>-<md5>/`` and return that folder.

    ``cache`` defaults to :func:`cache_root`.
    The folder gets a ``.bnnbench-source.json`` marker recording the archive's md5.  Extraction goes
    to a temporary folder renamed into place, so a half-extracted copy is never used.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise DataNotFoundError(f"archive {tar_path} does not exist")
    md5 = file_md5(tar_path)
    target = (cache or cache_root()) / "extracted" / f"{tar_path.name.split('.')[0]}-{md5}"
    if target.is_dir():
        return target
    with atomic_directory(target) as tmp:
        with open_complete_tar(tar_path) as tf:
            tf.extractall(tmp, filter="data")
        write_json(tmp / SOURCE_MARKER, {"archive": str(tar_path.resolve()), "md5": md5, "note": archive_note(md5)})
    return target
