"""``s3 info``: versions, device, models and the checkpoints found."""

from __future__ import annotations

import json
import platform

import typer

from s3cli.cli.console import err_console

__all__ = ["info"]


def info(as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout.")) -> None:
    """Show versions, compute devices, models and the checkpoints found."""
    import av
    import numpy
    import torch

    from s3cli import __version__
    from s3cli.model.loading import KNOWN_CHECKPOINTS, find_checkpoint, weights_dirs
    from s3cli.model.registry import PRESETS

    try:
        from s3cli.model.backbones.efficientnet_lite import default_weights_path

        path = default_weights_path()
        lite = str(path) if path.is_file() else f"unavailable ({path} is missing)"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        lite = f"unavailable ({exc})"
    data = {
        "s3cli": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "av": av.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "weights_dirs": [str(d) for d in weights_dirs()],
        "models": {
            name: str(p) if (p := find_checkpoint(name)) else None for name in PRESETS
        }
        | {"lite": lite},
        "known_checkpoints": [k.filename for k in KNOWN_CHECKPOINTS],
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key == "models":
            for name, path in value.items():
                err_console.print(f"model {name:12s} {path or '-- no checkpoint found'}")
        elif key != "known_checkpoints":
            err_console.print(f"{key:14s} {value}")
