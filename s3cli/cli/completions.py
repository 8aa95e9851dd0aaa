"""Shell completion scripts for bash, zsh and fish, generated from the app.

    python -m s3cli.cli.completions completions/    # regenerate the files in the repository

The scripts ask ``s3`` itself for candidates (Typer's completion protocol), so new commands
and options complete without regenerating; the files change only with the protocol.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["SHELLS", "completion_script", "write_completions"]

SHELLS = {"bash": "s3.bash", "zsh": "_s3", "fish": "s3.fish"}


def completion_script(shell: str) -> str:
    """The script Typer emits for ``shell`` when asked through ``_S3_COMPLETE``."""
    env = dict(os.environ, _S3_COMPLETE=f"source_{shell}")
    code = "from s3cli.cli.main import app; app(prog_name='s3')"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() + "\n"


def write_completions(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in SHELLS.items():
        path = folder / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(completion_script(shell))
        os.replace(tmp, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_completions(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(p)
