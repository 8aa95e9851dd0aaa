"""Error types shown to users. A leaf module: imports nothing of ours.

Every message reads ``<path>: <what is wrong> (<what to do>)`` so the CLI can print it as one line.
"""

from __future__ import annotations

__all__ = ["S3Error", "InputError", "CheckpointError", "OutputError", "DatasetError"]


class S3Error(Exception):
    """Base class of every error caused by the user's input, files or environment."""


class InputError(S3Error):
    """A video, frame folder, mask, palette or RLE file that cannot be used."""


class CheckpointError(S3Error):
    """A checkpoint that is missing, unreadable, of the wrong model or mis-shaped."""


class OutputError(S3Error):
    """An output location that cannot be written."""


class DatasetError(S3Error):
    """A dataset folder that does not have the expected layout."""
