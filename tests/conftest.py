"""Shared test helpers: where the golden fixtures live and how to compare against them.

The parity fixtures come from ``../shared`` beside the repository. On a user's machine without
it the parity tests skip with that reason; in CI (``CI=true``) a missing ``../shared`` is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("S3_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_shared(path: Path) -> Path:
    """Return ``path`` inside ../shared, skipping (or failing in CI) when it is absent."""
    if not path.exists():
        msg = f"{path} not found: the shared fixtures must sit beside the repository"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return require_shared(FIXTURES)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared(SHARED)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(require_shared(path)) as z:
        return {k: z[k] for k in z.files}


def assert_close(ours, ref: np.ndarray, *, rel: float = 1e-4, name: str = "") -> None:
    """``max|ours - ref| <= rel * max(1, max|ref|)`` (the fixtures' recommended check)."""
    ours = np.asarray(ours.detach().float().cpu() if hasattr(ours, "detach") else ours)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    tol = rel * max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ours.astype(np.float64) - ref).max())
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol:.3g}"


def assert_close_elementwise(ours, ref: np.ndarray, *, tol: float, name: str = "") -> None:
    """``|ours - ref| <= tol * (1 + |ref|)`` everywhere (the S3 fixtures' suggested check)."""
    ours = np.asarray(ours.detach().float().cpu() if hasattr(ours, "detach") else ours)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    excess = np.abs(ours.astype(np.float64) - ref) - tol * (1 + np.abs(ref))
    worst = float(excess.max())
    assert worst <= 0, f"{name}: exceeds tol {tol} by {worst:.3g}"
