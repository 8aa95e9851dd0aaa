"""``s3 score``: DAVIS-2017 J&F of a prediction folder against a ground-truth folder.

The per-sequence CSV goes beside the predictions by default (``<pred>/scores.csv``), as the
official DAVIS 2017 script writes its ``global_results`` and ``per-sequence_results`` CSVs into
the results folder. It has one row per sequence after a first ``Global`` row, whose numbers are
averaged over all objects (not over the sequence rows), as DAVIS does.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from s3cli.cli.console import err_console
from s3cli.errors import OutputError

if TYPE_CHECKING:
    from s3cli.eval.scoring import ScoreReport, Summary

__all__ = ["score", "score_table", "report_csv", "report_json", "write_text_atomic"]

CSV_NAME = "scores.csv"


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def report_json(report: ScoreReport) -> dict[str, Any]:
    """Global numbers and a ``sequences`` mapping with the same keys; NaN becomes null."""
    out: dict[str, Any] = {k: _number(v) for k, v in report.summary.as_dict().items()}
    out["sequences"] = {
        s.name: {k: _number(v) for k, v in s.summary.as_dict().items()} for s in report.sequences
    }
    return out


def _csv_row(name: str, frames: int, summary: Summary) -> list[str]:
    values = ["" if math.isnan(v) else f"{v:.6f}" for v in summary.as_dict().values()]
    return [name, str(summary.num_objects), str(frames), *values]


def report_csv(report: ScoreReport) -> str:
    """CSV text: a ``Global`` row, then one row per sequence; NaN is an empty field."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = list(report.summary.as_dict())
    writer.writerow(["Sequence", "Objects", "Frames", *keys])
    writer.writerow(_csv_row("Global", report.num_frames, report.summary))
    for s in report.sequences:
        writer.writerow(_csv_row(s.name, len(s.frames), s.summary))
    return buf.getvalue()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: all or nothing."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder (give a file name for --csv)")
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot be written: {exc.strerror or exc} (check that {folder} exists and "
            "is writable, or pass another --csv)"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(
                f"{path}: cannot be written: {exc.strerror or exc} (pass another --csv)"
            ) from None
        raise


def _check_writable(path: Path) -> None:
    """Fail before scoring rather than after it when the CSV cannot go where asked."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder (give a file name for --csv)")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(
            f"{path}: cannot be written: folder {folder} does not exist (create it or pass "
            "another --csv)"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            f"{path}: cannot be written: folder {folder} is not writable (pass another --csv)"
        )


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def score_table(report: ScoreReport) -> Table:
    table = Table(title="DAVIS 2017 J&F (semi-supervised)", title_justify="left")
    table.add_column("Sequence", overflow="fold")
    table.add_column("Obj", justify="right")
    for header in ("J&F", "J", "J rec", "J dec", "F", "F rec", "F dec"):
        table.add_column(header, justify="right")

    def row(name: str, summary: Summary, style: str | None = None) -> None:
        values = [_fmt(v) for v in summary.as_dict().values()]
        table.add_row(Text(name), str(summary.num_objects), *values, style=style)

    for s in report.sequences:
        row(s.name, s.summary)
    table.add_section()
    row("Global", report.summary, style="bold")
    return table


def score(
    gt: Path = typer.Option(
        ...,
        "--gt",
        help="Ground-truth folder: <gt>/<sequence>/<frame>.png, pixel value = object id.",
        show_default=False,
    ),
    pred: Path = typer.Option(
        ...,
        "--pred",
        help="Prediction folder with the same layout and file names.",
        show_default=False,
    ),
    workers: int | None = typer.Option(
        None,
        "-n",
        "--workers",
        min=1,
        help="Worker processes (default: the CPU cores; one for small jobs).",
        show_default=False,
    ),
    csv_path: Path | None = typer.Option(
        None,
        "--csv",
        help=f"Per-sequence CSV to write (default: <pred>/{CSV_NAME}).",
        show_default=False,
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the global and per-sequence numbers as JSON on stdout."
    ),
) -> None:
    """Score predicted masks against ground truth with the DAVIS 2017 J&F protocol.

    J is the region IoU and F the boundary F-measure of each object of the first ground-truth frame.

    Every frame but the first and the last is scored. The numbers are fractions, as in DAVIS's CSVs.

    The table goes to stderr; --json prints the numbers on stdout.
    """

    from s3cli.eval.scoring import score_folders

    out_path = csv_path if csv_path is not None else pred / CSV_NAME
    if csv_path is not None or pred.is_dir():  # a missing --pred is reported by the scorer
        _check_writable(out_path)

    if err_console.is_terminal:
        with Progress(
            TextColumn("scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
            auto_refresh=False,  # no refresh thread: the scorer forks worker processes
        ) as bar:
            task = bar.add_task("frames", total=None)

            def on_progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, refresh=True)

            report = score_folders(gt, pred, workers=workers, progress=on_progress)
    else:
        report = score_folders(gt, pred, workers=workers)

    for note in report.notes:
        err_console.print(Text.assemble(("warning:", "yellow"), " ", note))
    # A pipe or a log file gets the whole table rather than rich's 80-column default.
    console = err_console
    if not console.is_terminal:
        longest = max((len(s.name) for s in report.sequences), default=8)
        console = Console(stderr=True, highlight=False, width=max(console.width, longest + 84))
    console.print(score_table(report))
    write_text_atomic(out_path, report_csv(report))
    err_console.print(f"wrote {out_path}", markup=False, emoji=False)
    if as_json:
        typer.echo(json.dumps(report_json(report), indent=2, allow_nan=False))
