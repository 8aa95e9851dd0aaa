"""``s3 weights``: the supported checkpoints, which are present, and checking a file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from s3cli.cli.console import err_console

__all__ = ["weights_app"]

weights_app = typer.Typer(
    help="List supported checkpoints and check checkpoint files.", no_args_is_help=False
)


@weights_app.callback(invoke_without_command=True)
def list_weights(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the supported checkpoints and where each is present."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from s3cli.model.loading import KNOWN_CHECKPOINTS, weights_dirs

    rows = []
    for known in KNOWN_CHECKPOINTS:
        found = next((d / known.filename for d in weights_dirs() if (d / known.filename).is_file()),
                     None)
        rows.append(
            {
                "file": known.filename,
                "model": known.model,
                "size": known.size,
                "md5": known.md5,
                "url": known.url,
                "present": str(found) if found else None,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Supported checkpoints")
    for col in ("file", "model", "size", "md5", "present"):
        table.add_column(col)
    for r in rows:
        size = f"{r['size'] / 1e6:.1f} MB" if r["size"] else "-"
        table.add_row(r["file"], r["model"], size, r["md5"] or "-", r["present"] or "-")
    err_console.print(table)


@weights_app.command("check")
def check_weights(
    path: Path = typer.Argument(..., help="Checkpoint file (.pth, .pt or .safetensors)."),
    model: str = typer.Option(None, "--model", help="Fail unless it holds this model."),
) -> None:
    """Load a checkpoint strictly and print the model it holds (JSON on stdout)."""
    from s3cli.model.loading import load_network_from_file

    net = load_network_from_file(path, expect=model)
    n = sum(p.numel() for p in net.parameters())
    typer.echo(json.dumps({"path": str(path), "model": net.cfg.name, "parameters": n}))


@weights_app.command("fetch")
def fetch_weights(
    name: str = typer.Argument(..., help="Checkpoint file name (see `s3 weights`)."),
    dest: Path = typer.Option(Path("weights"), "--dest", help="Folder to save into."),
    mirror: str = typer.Option(None, "--mirror", help="Base URL of a mirror holding the file."),
) -> None:
    """Download a checkpoint, verify its size, hash and contents, and save it atomically."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from s3cli.model.download import fetch_checkpoint

    with Progress(
        "{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task(name, total=None)
        path = fetch_checkpoint(
            name,
            dest,
            mirror=mirror,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    typer.echo(str(path))
