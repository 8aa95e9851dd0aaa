"""``s3 train``: train or fine-tune S3 / Cutie on DAVIS, YouTube-VOS, MOSE, BURST, OVIS.

Run it directly for one process, or under ``torchrun`` for several GPUs / nodes::

    torchrun --nproc_per_node 8 -m s3cli train --data davis=DAVIS --data ytvos=YTVOS \\
        --model s3-base --backbone depth_anything_vitb14.pth --output runs/s3

Hyperparameters default to the paper's recipe; a TOML ``--config`` file sets any of them (its keys
are the option names with ``_`` for ``-``), and options given on the command line win.
"""

from __future__ import annotations

from pathlib import Path

import typer

from s3cli.cli.console import err_console
from s3cli.errors import InputError

__all__ = ["train"]


def _d(name: str) -> str:
    from s3cli.train.config import field_default

    value = field_default(name)
    if isinstance(value, tuple):
        value = ",".join(str(v) for v in value)
    return f"(default {value})"


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{flag} {text}: expected numbers separated by commas") from None


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{flag} {text}: expected integers separated by commas") from None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + items + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_to_toml(cfg: object) -> str:
    """The resolved settings as a config file ``--config`` reads back."""
    lines = []
    for key, value in cfg.to_dict().items():  # type: ignore[attr-defined]
        if value is None:
            lines.append(f"# {key} = (not set)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def train(
    data: list[str] = typer.Option(
        None, "--data", help="Training dataset KIND=DIR (KIND: davis, ytvos, mose, burst, ovis, "
        "generic); repeat for several.", show_default=False
    ),
    model: str = typer.Option(None, "--model", help=f"s3-base, cutie-base or cutie-small. "
                              f"{_d('model')}"),
    init: Path = typer.Option(None, "--init", help="Checkpoint to start from (fine-tuning)."),
    backbone: list[Path] = typer.Option(
        None, "--backbone", help="Backbone weights: ViT-B (DINOv2 / Depth-Anything) for S3, "
        "torchvision ImageNet ResNet for Cutie.", show_default=False
    ),
    iterations: int = typer.Option(
        None, "--iterations", help="Training iterations (default 150000, or 190000 with MOSE, "
        "BURST or OVIS)."
    ),
    output: Path = typer.Option(None, "--output", "-o", help="Run folder: checkpoints, log.csv."),
    config: Path = typer.Option(None, "--config", help="TOML file of settings."),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved settings as TOML and exit."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue from OUTPUT/checkpoint.pth if present."
    ),
    stop_at: int = typer.Option(
        None, "--stop-at", help="Stop (and checkpoint) after this iteration; run again to go on."
    ),
    batch_size: int = typer.Option(None, "--batch-size", help=f"Global batch. {_d('batch_size')}"),
    lr: float = typer.Option(None, "--lr", help=f"AdamW learning rate. {_d('lr')}"),
    weight_decay: float = typer.Option(None, "--weight-decay", help=_d("weight_decay")),
    embed_weight_decay: float = typer.Option(
        None, "--embed-weight-decay", help=f"For query embeddings. {_d('embed_weight_decay')}"
    ),
    backbone_lr_ratio: float = typer.Option(
        None, "--backbone-lr-ratio", help=f"Image encoder lr factor. {_d('backbone_lr_ratio')}"
    ),
    drop_path: float = typer.Option(None, "--drop-path", help=f"S3 adapter. {_d('drop_path')}"),
    lr_steps: str = typer.Option(
        None, "--lr-steps", help=f"LR x gamma at these fractions of training. {_d('lr_steps')}"
    ),
    lr_gamma: float = typer.Option(None, "--lr-gamma", help=_d("lr_gamma")),
    clip_grad_norm: float = typer.Option(None, "--clip-grad-norm", help=_d("clip_grad_norm")),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="Mixed precision on CUDA (default on)."),
    amp_dtype: str = typer.Option(None, "--amp-dtype", help=f"float16|bfloat16. {_d('amp_dtype')}"),
    seq_length: int = typer.Option(
        None, "--seq-length", help=f"Frames per training sequence. {_d('seq_length')}"
    ),
    mem_frames: int = typer.Option(
        None, "--mem-frames", help=f"Memory frames read per frame. {_d('mem_frames')}"
    ),
    max_skip: str = typer.Option(None, "--max-skip", help=f"Max frame gap. {_d('max_skip')}"),
    max_skip_switch: str = typer.Option(
        None, "--max-skip-switch", help=f"Fractions where --max-skip moves on. "
        f"{_d('max_skip_switch')}"
    ),
    num_objects: int = typer.Option(
        None, "--num-objects", help=f"Objects per sequence at most. {_d('num_objects')}"
    ),
    crop_size: int = typer.Option(None, "--crop-size", help=f"Square crop. {_d('crop_size')}"),
    davis_repeat: int = typer.Option(None, "--davis-repeat", help=_d("davis_repeat")),
    merge_prob: float = typer.Option(
        None, "--merge-prob", help=f"Cut-and-paste probability. {_d('merge_prob')}"
    ),
    deep_update_prob: float = typer.Option(None, "--deep-update-prob",
                                           help=_d("deep_update_prob")),
    points: int = typer.Option(None, "--points", help=f"Loss points per frame. {_d('points')}"),
    oversample_ratio: float = typer.Option(None, "--oversample-ratio",
                                           help=_d("oversample_ratio")),
    importance_ratio: float = typer.Option(None, "--importance-ratio",
                                           help=_d("importance_ratio")),
    sensory_aux_weight: float = typer.Option(None, "--sensory-aux-weight",
                                             help=_d("sensory_aux_weight")),
    query_aux_weight: float = typer.Option(None, "--query-aux-weight",
                                           help=_d("query_aux_weight")),
    seed: int = typer.Option(None, "--seed", help=_d("seed")),
    workers: int = typer.Option(None, "--workers", help=f"Loader processes. {_d('workers')}"),
    save_every: int = typer.Option(None, "--save-every", help=_d("save_every")),
    log_every: int = typer.Option(None, "--log-every", help=_d("log_every")),
    device: str = typer.Option(None, "--device", help=f"auto|cpu|cuda|mps. {_d('device')}"),
    tensorboard: bool = typer.Option(
        None, "--tensorboard/--no-tensorboard",
        help="TensorBoard events too, if installed (default on)."
    ),
) -> None:
    """Train or fine-tune a model (single process, or multi-GPU under torchrun)."""
    from s3cli.train.config import load_config_file, merge_config, parse_data_spec

    file_values = load_config_file(config) if config is not None else {}
    overrides = {
        "data": tuple(parse_data_spec(d) for d in data) if data else None,
        "model": model,
        "init": str(init) if init is not None else None,
        "backbone": tuple(str(b) for b in backbone) if backbone else None,
        "iterations": iterations,
        "output": str(output) if output is not None else None,
        "stop_at": stop_at,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "embed_weight_decay": embed_weight_decay,
        "backbone_lr_ratio": backbone_lr_ratio,
        "drop_path": drop_path,
        "lr_steps": _floats(lr_steps, "--lr-steps"),
        "lr_gamma": lr_gamma,
        "clip_grad_norm": clip_grad_norm,
        "amp": amp,
        "amp_dtype": amp_dtype,
        "seq_length": seq_length,
        "mem_frames": mem_frames,
        "max_skip": _ints(max_skip, "--max-skip"),
        "max_skip_switch": _floats(max_skip_switch, "--max-skip-switch"),
        "num_objects": num_objects,
        "crop_size": crop_size,
        "davis_repeat": davis_repeat,
        "merge_prob": merge_prob,
        "deep_update_prob": deep_update_prob,
        "points": points,
        "oversample_ratio": oversample_ratio,
        "importance_ratio": importance_ratio,
        "sensory_aux_weight": sensory_aux_weight,
        "query_aux_weight": query_aux_weight,
        "seed": seed,
        "workers": workers,
        "save_every": save_every,
        "log_every": log_every,
        "device": device,
        "tensorboard": tensorboard,
    }
    if "output" not in file_values and output is None and not print_config:
        raise InputError("no --output folder given (it receives checkpoints and log.csv)")
    cfg = merge_config(file_values, overrides)
    if print_config:
        typer.echo(config_to_toml(cfg), nl=False)
        return
    cfg.validate()
    _run(cfg, resume)


def _run(cfg: object, resume: bool) -> None:
    import os

    from s3cli.train.trainer import run_training

    main = int(os.environ.get("RANK", "0")) == 0

    def say(message: str) -> None:
        if main:
            err_console.print(message, markup=False, highlight=False)

    if main and err_console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
        ) as bar:
            task = bar.add_task("train", total=None, info="")

            def on_progress(done: int, total: int, values: dict) -> None:
                bar.update(task, completed=done, total=total,
                           info=f"loss {values['loss']:.4f} lr {values['lr']:.2e}")

            result = run_training(cfg, resume=resume, progress=on_progress, say=say)  # type: ignore[arg-type]
    else:
        log_every = cfg.log_every  # type: ignore[attr-defined]

        def on_progress(done: int, total: int, values: dict) -> None:
            if done % log_every == 0 or done == total:
                say(f"it {done}/{total} loss {values['loss']:.4f} lr {values['lr']:.2e}")

        result = run_training(cfg, resume=resume, progress=on_progress, say=say)  # type: ignore[arg-type]
    say(
        f"done: iteration {result.iteration} in {result.seconds:.1f} s; checkpoint "
        f"{result.checkpoint} (use it with s3 segment --weights)"
    )
