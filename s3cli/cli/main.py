"""The ``s3`` Typer app: commands are registered here; errors are turned into one stderr line."""

from __future__ import annotations

import sys
from typing import Any

import typer

from s3cli.cli.console import error_line
from s3cli.errors import S3Error

__all__ = ["app", "main"]


class _App(typer.Typer):
    """A Typer app whose user-facing errors end as one line and a non-zero exit code."""

    debug: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except S3Error as exc:
            if _App.debug:
                raise
            error_line(str(exc))
            sys.exit(1)
        except KeyboardInterrupt:
            error_line("interrupted")
            sys.exit(130)


app = _App(
    name="s3",
    help="Track and segment objects through videos (S3 / Cutie video object segmentation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one error line."),
) -> None:
    _App.debug = debug


@app.command()
def version() -> None:
    """Print the version."""
    from s3cli import __version__

    typer.echo(__version__)


def main() -> None:
    app(prog_name="s3")
