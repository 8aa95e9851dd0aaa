"""``s3 segment``: track objects through videos or frame folders from a first mask."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from s3cli.cli.console import err_console, error_line
from s3cli.errors import InputError, S3Error

__all__ = ["segment"]

_MODELS = ("auto", "s3-base", "cutie-base", "cutie-small", "lite")
_DIRECTIONS = ("auto", "forward", "backward", "both")


def _read_list(spec: str) -> list[tuple[Path, Path | None]]:
    """``video[<TAB>mask]`` lines from a file or ``-`` (stdin); blank and # lines skipped."""
    if spec == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(spec).read_text()
        except OSError as exc:
            raise InputError(f"{spec}: cannot read the list ({exc.strerror})") from exc
    jobs = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        jobs.append((Path(parts[0].strip()), Path(parts[1].strip()) if len(parts) > 1 else None))
    return jobs


def _shard(spec: str | None, n_items: int) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise InputError(f"--shard {spec}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {spec}: needs 0 <= i < n")
    return i, n


def _templated(path: Path | None, name: str, batch: bool, flag: str) -> Path | None:
    if path is None:
        return None
    text = str(path)
    if "{name}" in text:
        return Path(text.replace("{name}", name))
    if batch:
        raise InputError(f"{flag} {path}: with several inputs, put {{name}} in the path")
    return path


def segment(
    inputs: list[Path] = typer.Argument(
        None, help="Video files or folders of frames.", show_default=False
    ),
    mask: Path = typer.Option(
        None, "--mask", "-m", help="First mask: palette/binary PNG or COCO RLE JSON."
    ),
    mask_frame: int = typer.Option(0, "--mask-frame", help="Frame that --mask annotates."),
    mask_dir: Path = typer.Option(
        None, "--mask-dir", help="Masks named by frame (00005.png): objects may appear later."
    ),
    resize_mask: bool = typer.Option(
        False, "--resize-mask", help="Scale masks of another size to the video (nearest)."
    ),
    model: str = typer.Option(
        "auto", "--model", help=f"One of {', '.join(_MODELS)}; auto: a checkpoint, else lite."
    ),
    weights: Path = typer.Option(None, "--weights", help="Checkpoint file to use."),
    size: str = typer.Option("480", "--size", help="Internal shorter side: 480|600|720|native."),
    mem_every: int = typer.Option(5, "--mem-every", min=1, help="Memorise every N frames."),
    top_k: int = typer.Option(30, "--top-k", min=1, help="Memory entries read per pixel."),
    long_term: bool = typer.Option(
        True, "--long-term/--no-long-term", help="Long-term memory (bounded on long videos)."
    ),
    flip: bool = typer.Option(False, "--flip", help="Flip test-time augmentation."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps."),
    precision: str = typer.Option("fp32", "--precision", help="fp32|bf16|fp16."),
    compile_: bool = typer.Option(
        False, "--compile", help="torch.compile the network (S3/Cutie; first frames compile)."
    ),
    direction: str = typer.Option(
        "auto", "--direction", help="forward|backward|both|auto. both: also segment before the "
        "earliest mask (backward pass) and fuse forward and backward between masks; auto: both "
        "when the earliest mask is not on the first frame, else forward."
    ),
    spill_dir: Path = typer.Option(
        None, "--spill-dir", help="Folder for the temporary frames of a backward pass "
        "(default: the system's temporary folder; removed when done)."
    ),
    start: int = typer.Option(0, "--start", min=0, help="First frame to process."),
    end: int = typer.Option(None, "--end", min=1, help="Stop before this frame."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Folder for palette PNG masks (one sub-folder per input "
        "when there are several)."
    ),
    binary: bool = typer.Option(False, "--binary", help="Also per-object 0/255 PNGs."),
    overlay: bool = typer.Option(False, "--overlay", help="Also blended overlay JPEGs."),
    mp4: Path = typer.Option(None, "--mp4", help="Overlay video (use {name} with several)."),
    rle: Path = typer.Option(None, "--rle", help="COCO RLE JSON lines, one line per frame."),
    save_scores: Path = typer.Option(
        None, "--save-scores", help="Folder for per-frame probabilities (.npz)."
    ),
    from_list: str = typer.Option(
        None, "--from-list", help="File (or -) with one video[<TAB>mask] per line."
    ),
    skip_done: bool = typer.Option(False, "--skip-done", help="Skip inputs already finished."),
    shard: str = typer.Option(None, "--shard", help="i/n: process every n-th input from i."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Segment the objects of a first mask through every frame of each input.

    Masks on later frames (--mask-frame, --mask-dir) are keyframes: with --direction both
    (the default when the earliest mask is not on the first frame) the frames before it are
    segmented backward from it, and between two keyframes a forward and a backward pass are
    fused, so every frame gets a mask."""
    from s3cli.api import SegmentOptions, load_tracking_model, resolve_device, segment_video
    from s3cli.io.outputs import OutputOptions

    jobs: list[tuple[Path, Path | None]] = [(p, None) for p in inputs or []]
    if from_list is not None:
        jobs += _read_list(from_list)
    if not jobs:
        raise InputError("no input given (pass a video or a folder of frames, or --from-list)")
    if model not in _MODELS:
        raise InputError(f"--model {model}: choose one of {', '.join(_MODELS)}")
    if direction not in _DIRECTIONS:
        raise InputError(f"--direction {direction}: choose one of {', '.join(_DIRECTIONS)}")
    if not any((output, mp4, rle, save_scores)):
        raise InputError("nothing to write: use -o DIR, --mp4 FILE, --rle FILE or --save-scores")
    if (binary or overlay) and output is None:
        raise InputError("--binary and --overlay write into the -o folder: give -o DIR")
    batch = len(jobs) > 1
    i, n = _shard(shard, len(jobs))
    jobs = jobs[i::n]

    network = name = None
    results: list[dict] = []
    failed = 0
    for video, job_mask in jobs:
        stem = video.stem if video.is_file() else video.name
        masks_dir = (output / stem if batch else output) if output is not None else None
        marker = (masks_dir or Path(".")) / ".s3-done.json"
        if skip_done and masks_dir is not None and marker.is_file():
            err_console.print(f"skip {video} (done)")
            results.append({"source": str(video), "status": "skipped"})
            continue
        try:
            outputs = OutputOptions(
                masks_dir=masks_dir,
                binary=binary,
                overlay=overlay,
                mp4=_templated(mp4, stem, batch, "--mp4"),
                rle=_templated(rle, stem, batch, "--rle"),
                scores_dir=_templated(save_scores, stem, batch, "--save-scores"),
            )
            options = SegmentOptions(
                source=video,
                mask=job_mask or mask,
                mask_frame=mask_frame,
                mask_dir=mask_dir,
                resize_mask=resize_mask,
                model=model,
                weights=weights,
                size=size,
                mem_every=mem_every,
                top_k=top_k,
                long_term=long_term,
                flip=flip,
                device=device,
                precision=precision,
                compile=compile_,
                start=start,
                end=end,
                outputs=outputs,
                direction=direction,
                spill_dir=spill_dir,
            )
            if network is None:
                network, name = load_tracking_model(model, weights, resolve_device(device))
            summary = _run_one(options, network, name, segment_video)
        except S3Error as exc:
            if not batch:
                raise
            failed += 1
            error_line(str(exc))
            results.append({"source": str(video), "status": "failed", "error": str(exc)})
            continue
        if masks_dir is not None:
            _write_marker(marker, summary.to_dict())
        n_obj = len(summary.object_ids)
        err_console.print(
            f"done {video}: {summary.frames} frames in {summary.seconds:.1f} s "
            f"({summary.fps:.2f} frames/s), {n_obj} object{'' if n_obj == 1 else 's'}, "
            f"peak memory {summary.peak_memory_mb:.0f} MiB"
        )
        results.append({"status": "ok", **summary.to_dict()})
    if as_json:
        payload = results[0] if not batch and results else {"videos": results, "failed": failed}
        typer.echo(json.dumps(payload))
    if failed:
        raise typer.Exit(1)


def _run_one(options, network, name, segment_video):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    if not err_console.is_terminal:
        return segment_video(options, network=network, model_name=name)
    with Progress(
        TextColumn(f"{options.source.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("segment", total=None)

        def on_frame(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        return segment_video(options, on_frame=on_frame, network=network, model_name=name)


def _write_marker(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
