"""s3: semi-supervised video object segmentation with the S3 and Cutie models.

Public API (imported lazily so that ``s3 --help`` never loads torch)::

    from s3cli import load_model, Tracker
"""

from __future__ import annotations

import importlib
from typing import Any

from s3cli.errors import CheckpointError, DatasetError, InputError, OutputError, S3Error

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model",
    "Tracker",
    "InferenceConfig",
    "S3Error",
    "InputError",
    "CheckpointError",
    "OutputError",
    "DatasetError",
]

_LAZY = {
    "load_model": "s3cli.model.loading",
    "Tracker": "s3cli.inference.engine",
    "InferenceConfig": "s3cli.inference.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 's3cli' has no attribute {name!r}")
