"""Errors raised by the data layer: each names the file or folder at fault and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """A data set that cannot be used as given (bad layout, mismatched classes, bad option)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """No copy of the data set where we looked; the message lists the places and what to pass."""


class BadImageError(DataError):
    """An image file that cannot be decoded; ``path`` names it (``archive.tar:member`` inside a tar)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot decode image {path}: {reason}. Remove or replace the file, "
            "or pass skip_bad_images=True (--skip-bad-images) to skip unreadable images and count them"
        )
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) when a DataLoader worker sends the error back
        return (type(self), (self.path, self.reason))
