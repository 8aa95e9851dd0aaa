"""The ``s3`` Typer app: commands are registered here; errors are turned into one stderr line."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from s3cli.cli.console import error_line
from s3cli.errors import S3Error

__all__ = ["app", "main"]


class _Group(TyperGroup):
    """Runs a command; a user-facing error ends as one stderr line and exit code 1, Ctrl-C as
    exit code 130. ``--debug`` shows the traceback instead."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except S3Error as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            error_line(str(exc))
            ctx.exit(1)
        except KeyboardInterrupt:
            error_line("interrupted")
            ctx.exit(130)


app = typer.Typer(
    name="s3",
    cls=_Group,
    help="Track and segment objects through videos (S3 / Cutie video object segmentation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one error line."),
) -> None:
    ctx.obj = {"debug": debug}


@app.command()
def version() -> None:
    """Print the version."""
    from s3cli import __version__

    typer.echo(__version__)


from s3cli.cli.info import info  # noqa: E402
from s3cli.cli.segment import segment  # noqa: E402
from s3cli.cli.weights import weights_app  # noqa: E402

app.command("segment")(segment)
app.command("info")(info)

app.add_typer(weights_app, name="weights")

from s3cli.cli.score import score  # noqa: E402

app.command("score")(score)

from s3cli.cli.eval import eval_command  # noqa: E402

app.command("eval")(eval_command)


from s3cli.cli.train import train  # noqa: E402

app.command("train")(train)


def main() -> None:
    app(prog_name="s3")
