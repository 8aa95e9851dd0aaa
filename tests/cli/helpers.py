"""Helpers shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def read_png(path: Path) -> np.ndarray:
    """A PNG's pixel values (palette indices for palette PNGs)."""
    return np.array(Image.open(path))


def assert_one_error(result, *needles: str) -> None:
    """A failed CLI run: exit code 1, one ``error: ...`` line on stderr holding every needle,
    no traceback, nothing on stdout."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def default_sigint() -> None:
    """``preexec_fn`` for a child that must see Ctrl-C: a shell runs background jobs with SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler; restore the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
