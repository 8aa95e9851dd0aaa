"""Helpers shared by the benchmark scripts: the machine's own matmul throughput as a yardstick,
and where the davis16-mini data lives."""

from __future__ import annotations

import time
from pathlib import Path

import torch

__all__ = ["DAVIS16_MINI", "DAVIS_SEQUENCES", "REPO", "matmul_gflops", "median"]

REPO = Path(__file__).resolve().parents[1]
DAVIS16_MINI = REPO.parent / "shared" / "data" / "davis16-mini"
DAVIS_SEQUENCES = (
    "blackswan",
    "car-shadow",
    "motocross-jump",
    "breakdance",
    "bmx-trees",
    "camel",
    "soapbox",
)
"""The seven davis16-mini sequences: the three easy ones first (its README)."""


def matmul_gflops(n: int = 1024, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """Best GFLOP/s of an n x n x n matmul over about ``seconds`` (torch.matmul)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2
