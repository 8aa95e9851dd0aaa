"""``s3 score``: J&F of a prediction folder against a ground-truth folder (DAVIS or LVOS).

The per-sequence CSV goes beside the predictions by default (``<pred>/scores.csv``), as the
official DAVIS 2017 script writes its ``global_results`` and ``per-sequence_results`` CSVs into
the results folder. It has one row per sequence after a first ``Global`` row, whose numbers are
averaged over all objects (not over the sequence rows), as DAVIS does.

With ``--protocol lvos`` each object is scored over its frame range from the LVOS meta file; the
CSV then has ``Global``, ``Global-seen`` and ``Global-unseen`` rows and one row per object
(``<video>_<k>``), as LVOS's per-sequence CSV, and ``--json`` gives LVOS's global columns.
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
    from s3cli.eval.lvos_scoring import LvosReport
    from s3cli.eval.scoring import ScoreReport, Summary

    AnyReport = ScoreReport | LvosReport

__all__ = [
    "print_report",
    "report_csv",
    "report_json",
    "score",
    "score_table",
    "write_text_atomic",
]

CSV_NAME = "scores.csv"


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _is_lvos(report: AnyReport) -> bool:
    from s3cli.eval.lvos_scoring import LvosReport

    return isinstance(report, LvosReport)


def _lvos_groups(report: LvosReport) -> list[tuple[str, dict[str, float]]]:
    """``Global``, ``Global-seen``, ``Global-unseen`` rows: J&F, J, F and V means."""
    g = report.summary
    rows = []
    for label, suffix in (("Global", ""), ("Global-seen", "seen-"), ("Global-unseen", "unseen-")):
        j, f, v = g[f"J-{suffix}Mean"], g[f"F-{suffix}Mean"], g[f"V-{suffix}Mean"]
        rows.append((label, {"J&F-Mean": (j + f) / 2, "J-Mean": j, "F-Mean": f, "V-Mean": v}))
    return rows


def report_json(report: AnyReport) -> dict[str, Any]:
    """Global numbers and a ``sequences`` mapping with the same keys; NaN becomes null.

    For LVOS: LVOS's global columns, ``protocol: "lvos"`` and ``sequences`` keyed by object
    (``<video>_<k>``) with J&F, J, F and V means."""
    if _is_lvos(report):
        out: dict[str, Any] = {k: _number(v) for k, v in report.summary.items()}
        out["protocol"] = "lvos"
        out["sequences"] = {
            o.name: {k: _number(v) for k, v in o.as_dict().items()} for o in report.objects
        }
        return out
    out = {k: _number(v) for k, v in report.summary.as_dict().items()}
    out["sequences"] = {
        s.name: {k: _number(v) for k, v in s.summary.as_dict().items()} for s in report.sequences
    }
    return out


def _csv_row(name: str, frames: int, summary: Summary) -> list[str]:
    values = ["" if math.isnan(v) else f"{v:.6f}" for v in summary.as_dict().values()]
    return [name, str(summary.num_objects), str(frames), *values]


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def report_csv(report: AnyReport) -> str:
    """CSV text: a ``Global`` row, then one row per sequence; NaN is an empty field."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if _is_lvos(report):
        keys = ["J&F-Mean", "J-Mean", "F-Mean", "V-Mean"]
        writer.writerow(["Sequence", "Video", "Unseen", "Frames", *keys])
        for label, values in _lvos_groups(report):
            writer.writerow([label, "", "", str(report.num_frames),
                             *(_cell(values[k]) for k in keys)])
        for o in report.objects:
            writer.writerow([o.name, o.sequence, str(int(o.unseen)), str(len(o.frames)),
                             *(_cell(v) for v in o.as_dict().values())])
        return buf.getvalue()
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


def _lvos_table(report: LvosReport) -> Table:
    table = Table(title="LVOS J&F (semi-supervised)", title_justify="left")
    table.add_column("Object", overflow="fold")
    table.add_column("Unseen", justify="center")
    for header in ("J&F", "J", "F", "V"):
        table.add_column(header, justify="right")
    for o in report.objects:
        table.add_row(Text(o.name), "yes" if o.unseen else "", *map(_fmt, o.as_dict().values()))
    table.add_section()
    for label, values in _lvos_groups(report):
        table.add_row(label, "", *map(_fmt, values.values()),
                      style="bold" if label == "Global" else None)
    return table


def score_table(report: AnyReport) -> Table:
    if _is_lvos(report):
        return _lvos_table(report)
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


def print_report(report: AnyReport) -> None:
    """The report's notes and table on stderr (the whole table when stderr is not a terminal)."""
    for note in report.notes:
        err_console.print(Text.assemble(("warning:", "yellow"), " ", note))
    console = err_console
    if not console.is_terminal:  # a pipe or a log file gets the whole table, not 80 columns
        names = [o.name for o in report.objects] if _is_lvos(report) else [
            s.name for s in report.sequences
        ]
        longest = max(map(len, names), default=8)
        console = Console(stderr=True, highlight=False, width=max(console.width, longest + 84))
    console.print(score_table(report))


def _find_meta(gt: Path, meta: Path | None) -> Path:
    from s3cli.errors import InputError
    from s3cli.eval.lvos_scoring import find_lvos_meta

    if meta is not None:
        return meta
    found = find_lvos_meta(gt.parent)
    if found is None:
        raise InputError(
            f"{gt.parent}: no LVOS meta file (valid_meta.json or meta.json) beside the ground "
            "truth (pass it with --meta)"
        )
    return found


def _read_unseen(path: Path) -> list[str]:
    from s3cli.errors import InputError

    try:
        return path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a list of video names: {exc}") from None


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
    protocol: str = typer.Option(
        "davis",
        "--protocol",
        help="davis (DAVIS 2017; also DAVIS 2016, YouTube-VOS-style folders) or lvos.",
    ),
    meta: Path | None = typer.Option(
        None,
        "--meta",
        help="LVOS: the split's meta file with each object's frame range "
        "(default: *_meta.json or meta.json beside <gt>).",
        show_default=False,
    ),
    unseen: Path | None = typer.Option(
        None,
        "--unseen",
        help="LVOS: a file of unseen video names (default: LVOS's own list).",
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
    """Score predicted masks against ground truth with the DAVIS 2017 or the LVOS J&F protocol.

    J is the region IoU and F the boundary F-measure of each object of the first ground-truth
    frame (DAVIS) or of the meta file (LVOS, over each object's own frame range).

    DAVIS scores every frame but the first and the last. The numbers are fractions, as in the
    official CSVs.

    The table goes to stderr; --json prints the numbers on stdout.
    """
    from s3cli.errors import InputError

    if protocol not in ("davis", "lvos"):
        raise InputError(f"--protocol {protocol}: choose davis or lvos")
    if protocol == "davis" and (meta is not None or unseen is not None):
        raise InputError("--meta and --unseen belong to --protocol lvos")
    out_path = csv_path if csv_path is not None else pred / CSV_NAME
    if csv_path is not None or pred.is_dir():  # a missing --pred is reported by the scorer
        _check_writable(out_path)

    def run(progress: Any = None) -> AnyReport:
        if protocol == "lvos":
            from s3cli.eval.lvos_scoring import score_lvos

            names = _read_unseen(unseen) if unseen is not None else None
            return score_lvos(gt, pred, _find_meta(gt, meta), unseen=names, workers=workers,
                              progress=progress)
        from s3cli.eval.scoring import score_folders

        return score_folders(gt, pred, workers=workers, progress=progress)

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

            report = run(on_progress)
    else:
        report = run()

    print_report(report)
    write_text_atomic(out_path, report_csv(report))
    err_console.print(f"wrote {out_path}", markup=False, emoji=False)
    if as_json:
        typer.echo(json.dumps(report_json(report), indent=2, allow_nan=False))
