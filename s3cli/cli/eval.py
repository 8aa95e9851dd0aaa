"""``s3 eval``: run a model over a benchmark with the benchmark's protocol, then score it.

Progress and the score table go to stderr; ``--json`` prints the summary of ``s3 score --json``
plus ``frames``, ``seconds`` and ``fps`` (and where the outputs are) on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.text import Text

from s3cli.cli.console import err_console
from s3cli.errors import InputError

if TYPE_CHECKING:
    from s3cli.eval.runner import EvalResult

__all__ = ["eval_command"]

_MODELS = ("auto", "s3-base", "cutie-base", "cutie-small", "lite")
_DATASET_HELP = "davis16|davis17|ytvos18|ytvos19|mose|lvos|generic."


def _sequences(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise InputError(f"--sequences {spec!r}: give sequence names separated by commas")
    return names


def _summary_json(result: EvalResult, csv_path: Path | None) -> dict[str, Any]:
    from s3cli.cli.score import report_json

    out: dict[str, Any] = report_json(result.report) if result.report is not None else {}
    resumed = sum(1 for s in result.sequences if s.resumed)
    out.update(
        frames=result.frames,
        seconds=result.seconds,
        fps=result.fps,
        dataset=result.dataset.name,
        split=result.dataset.split,
        model=result.model,
        predictions=str(result.predictions),
        zip=str(result.zip_path) if result.zip_path is not None else None,
        csv=str(csv_path) if csv_path is not None else None,
        run=len(result.sequences) - resumed,
        resumed=resumed,
        notes=[*result.notes, *(result.report.notes if result.report is not None else ())],
    )
    return out


def _print_report(result: EvalResult) -> None:
    from s3cli.cli.score import print_report

    assert result.report is not None
    print_report(result.report)


def _run(options, callbacks_factory):
    from s3cli.eval.runner import run_eval

    if not err_console.is_terminal:
        return run_eval(options, callbacks_factory(None))
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        auto_refresh=False,  # no refresh thread: the scorer may fork worker processes
    ) as progress:
        return run_eval(options, callbacks_factory(progress))


def _callbacks(progress):
    from s3cli.eval.runner import EvalCallbacks

    task: dict[str, Any] = {}

    def sequence_start(seq, pos: int, total: int) -> None:
        if progress is not None:
            task["id"] = progress.add_task(f"{seq.name} ({pos}/{total})", total=None)
            progress.refresh()

    def frame(done: int, total: int | None) -> None:
        if progress is not None and "id" in task:
            progress.update(task["id"], completed=done, total=total, refresh=True)

    def sequence_end(res, pos: int, total: int) -> None:
        if progress is not None and "id" in task:
            progress.remove_task(task.pop("id"))
            progress.refresh()
        where = f"{res.name} ({pos}/{total})"
        if res.resumed:
            err_console.print(f"skip {where}: done earlier", markup=False, emoji=False)
        else:
            fps = res.frames / res.seconds if res.seconds > 0 else 0.0
            err_console.print(
                f"done {where}: {res.frames} frames in {res.seconds:.1f} s ({fps:.2f} frames/s)",
                markup=False,
                emoji=False,
            )

    def scoring(done: int, total: int) -> None:
        if progress is not None:
            if "score" not in task:
                task["score"] = progress.add_task("scoring", total=total)
            progress.update(task["score"], completed=done, total=total, refresh=True)

    return EvalCallbacks(
        sequence_start=sequence_start, frame=frame, sequence_end=sequence_end, scoring=scoring
    )


def eval_command(
    dataset: str = typer.Option(..., "--dataset", help=_DATASET_HELP, show_default=False),
    root: Path = typer.Option(..., "--root", help="The dataset's folder.", show_default=False),
    split: str = typer.Option(
        None, "--split", help="val (DAVIS), valid (YouTube-VOS, MOSE, LVOS), test-dev, ...",
        show_default=False,
    ),
    output: Path = typer.Option(
        None, "--output", "-o", show_default=False,
        help="Folder for predictions, zip and scores (default: eval-<dataset>-<split>).",
    ),
    sequences: str = typer.Option(
        None, "--sequences", help="Only these sequences: a,b,c.", show_default=False
    ),
    model: str = typer.Option(
        "auto", "--model", help=f"One of {', '.join(_MODELS)}; auto: a checkpoint, else lite."
    ),
    weights: Path = typer.Option(None, "--weights", help="Checkpoint file to use."),
    size: str = typer.Option(
        None, "--size", show_default=False,
        help="Internal shorter side: 480|600|720|native (default: the dataset's, 480).",
    ),
    mem_every: int = typer.Option(
        None, "--mem-every", min=1, help="Memorise every N frames (default: the dataset's, 5).",
        show_default=False,
    ),
    top_k: int = typer.Option(30, "--top-k", min=1, help="Memory entries read per pixel."),
    long_term: bool | None = typer.Option(
        None, "--long-term/--no-long-term", show_default=False,
        help="Long-term memory (default: the dataset's: on for LVOS and generic only).",
    ),
    flip: bool = typer.Option(False, "--flip", help="Flip test-time augmentation."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps."),
    precision: str = typer.Option("fp32", "--precision", help="fp32|bf16|fp16."),
    workers: int = typer.Option(
        None, "-n", "--workers", min=1, help="Scoring processes (default: the CPU cores).",
        show_default=False,
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the score summary plus frames/s as JSON on stdout."
    ),
) -> None:
    """Run a model over a benchmark dataset with its protocol, then score it.

    DAVIS: first-frame masks, every frame written, scored against the annotations.

    YouTube-VOS: every given mask (objects appear later), the frames of meta.json, a zip.

    MOSE, LVOS: their layouts and zips; LVOS valid is scored with LVOS's protocol.

    generic: JPEGImages/<seq>, Annotations/<seq>.

    A run that stops resumes where it stopped with the same --output.
    """
    from s3cli.cli.score import CSV_NAME, report_csv, write_text_atomic
    from s3cli.eval.datasets import DATASETS, DEFAULT_SPLITS
    from s3cli.eval.runner import EvalOptions

    if dataset not in DATASETS:
        raise InputError(f"--dataset {dataset}: choose one of {', '.join(DATASETS)}")
    if model not in _MODELS:
        raise InputError(f"--model {model}: choose one of {', '.join(_MODELS)}")
    if size is not None:
        from s3cli.api import parse_size

        parse_size(size)  # fail before the dataset is read
    if output is None:
        label = split or DEFAULT_SPLITS[dataset]
        output = Path(f"eval-{dataset}-{label}" if label else f"eval-{dataset}")
    options = EvalOptions(
        dataset=dataset,
        root=root,
        output=output,
        split=split,
        sequences=_sequences(sequences),
        model=model,
        weights=weights,
        size=size,
        mem_every=mem_every,
        top_k=top_k,
        long_term=long_term,
        flip=flip,
        device=device,
        precision=precision,
        workers=workers,
    )
    result = _run(options, _callbacks)

    for note in result.notes:
        err_console.print(Text.assemble(("note:", "cyan"), " ", note))
    csv_path = None
    if result.report is not None:
        _print_report(result)
        csv_path = output / CSV_NAME
        write_text_atomic(csv_path, report_csv(result.report))
        err_console.print(f"wrote {csv_path}", markup=False, emoji=False)
    if result.zip_path is not None:
        err_console.print(f"wrote {result.zip_path}", markup=False, emoji=False)
    err_console.print(
        f"{result.dataset.label}: {len(result.sequences)} sequences, {result.frames} frames in "
        f"{result.seconds:.1f} s ({result.fps:.2f} frames/s); masks in {result.predictions}",
        markup=False,
        emoji=False,
    )
    if as_json:
        typer.echo(json.dumps(_summary_json(result, csv_path), indent=2, allow_nan=False))
