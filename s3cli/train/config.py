"""Training configuration: one typed dataclass, defaults = the paper's recipe.

Values come from (lowest to highest precedence) the defaults here, a TOML config file
(``--config``), and command-line options. Unknown keys and wrongly typed values in a config file
are errors, so a misspelt hyperparameter cannot be silently ignored.

The defaults follow the S3 paper's training recipe (AdamW, lr 5e-5, weight decay 0.05, drop-path
0.15, batch 16, 8 frames of which 3 are memory, max-skip [5, 10, 15, 5] switched at 10/30/80% of
training, step lr, 150k iterations for DAVIS + YouTube-VOS or 190k with MOSE/OVIS/BURST, DAVIS
repeated 5 times, AMP, point-sampled loss, <= 3 objects, 480x480 crops); the remaining ones
(loss weights, point counts, gradient clipping, deep-update probability, lr-step positions)
are those of the official Cutie/S3 ``train_config.yaml``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3cli.errors import InputError

__all__ = [
    "DATASET_KINDS",
    "DataSpec",
    "TrainConfig",
    "load_config_file",
    "merge_config",
    "field_default",
    "parse_data_spec",
]

# kind -> (frame interval of the released frames, default repeat factor). The max-skip is given
# in frames of the original video, so it is divided by the interval (YouTube-VOS, MOSE and BURST
# release every 5th frame; the official configs use 2 for DAVIS and 3 for OVIS).
DATASET_KINDS: dict[str, tuple[int, int]] = {
    "davis": (2, 5),
    "ytvos": (5, 1),
    "mose": (5, 1),
    "burst": (5, 1),
    "ovis": (3, 1),
    "generic": (1, 1),
}
_MEGA_KINDS = frozenset({"mose", "burst", "ovis"})


@dataclass(frozen=True)
class DataSpec:
    """One training dataset: its kind (``davis``, ``ytvos``, ...) and folder."""

    kind: str
    root: str
    repeat: int | None = None  # None: the kind's default (DAVIS: davis_repeat)
    frame_interval: int | None = None  # None: the kind's default


def parse_data_spec(text: str, base: Path | None = None, where: str | None = None
                    ) -> DataSpec:
    """``KIND=DIR`` (``davis=/data/DAVIS``) -> DataSpec; a relative DIR is taken from ``base``.
    ``where`` names the source in error messages (default: the ``--data`` option)."""
    where = where or f"--data {text}"
    kind, sep, root = text.partition("=")
    kind = kind.strip().lower()
    if not sep or not root.strip():
        raise InputError(f"{where}: expected KIND=DIR (KIND one of {', '.join(DATASET_KINDS)})")
    if kind not in DATASET_KINDS:
        raise InputError(
            f"{where}: unknown dataset kind {kind!r} (choose from {', '.join(DATASET_KINDS)})"
        )
    path = Path(root.strip()).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return DataSpec(kind, str(path))


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``s3 train`` needs. Field names are the config-file keys."""

    model: str = "s3-base"
    data: tuple[DataSpec, ...] = ()
    output: str = "runs/train"
    init: str | None = None  # checkpoint to start from (fine-tuning)
    backbone: tuple[str, ...] = ()  # ViT (S3) or ImageNet ResNet (Cutie) weight files
    # None: 150k for DAVIS + YouTube-VOS, 190k when MOSE, BURST or OVIS is used (MEGA)
    iterations: int | None = None
    stop_at: int | None = None  # stop (with a checkpoint) after this iteration; resume later

    # optimisation
    batch_size: int = 16  # global: divided among the processes
    lr: float = 5e-5
    weight_decay: float = 0.05
    embed_weight_decay: float = 0.0
    backbone_lr_ratio: float = 0.1
    drop_path: float = 0.15
    lr_steps: tuple[float, ...] = (0.8, 0.92)  # fractions of the iterations
    lr_gamma: float = 0.1
    clip_grad_norm: float = 3.0
    amp: bool = True  # mixed precision (CUDA only: ignored on the CPU)
    amp_dtype: str = "float16"

    # sequences
    seq_length: int = 8
    mem_frames: int = 3
    max_skip: tuple[int, ...] = (5, 10, 15, 5)
    max_skip_switch: tuple[float, ...] = (0.1, 0.3, 0.8)  # fractions of the iterations
    num_objects: int = 3
    crop_size: int = 480
    davis_repeat: int = 5
    merge_prob: float = 0.5  # cut-and-paste of a second sequence's objects
    deep_update_prob: float = 0.2

    # loss
    points: int = 12544
    oversample_ratio: float = 3.0
    importance_ratio: float = 0.75
    sensory_aux_weight: float = 0.01
    query_aux_weight: float = 0.01

    # run
    seed: int = 14159265
    workers: int = 4  # data-loading processes per training process
    save_every: int = 10000
    log_every: int = 100
    device: str = "auto"
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed

    # ------------------------------------------------------------------ derived values
    @property
    def total_iterations(self) -> int:
        if self.iterations is not None:
            return self.iterations
        return 190_000 if any(d.kind in _MEGA_KINDS for d in self.data) else 150_000

    def lr_milestones(self) -> list[int]:
        n = self.total_iterations
        return [max(1, round(f * n)) for f in self.lr_steps]

    def max_skip_at(self, it: int) -> int:
        """The max-skip in force for iteration ``it`` (0-based)."""
        n = self.total_iterations
        skip = self.max_skip[0]
        for frac, value in zip(self.max_skip_switch, self.max_skip[1:], strict=True):
            if it >= round(frac * n):
                skip = value
        return skip

    def validate(self) -> TrainConfig:
        """Raise ``InputError`` naming the first inconsistent value; returns self."""
        from s3cli.model.registry import PRESETS

        def bad(name: str, value: object, what: str) -> InputError:
            return InputError(f"--{name.replace('_', '-')} {value}: {what}")

        if self.model not in PRESETS:
            raise bad("model", self.model, f"choose one of {', '.join(PRESETS)}")
        if not self.data:
            raise InputError("no training data (give --data KIND=DIR, e.g. --data davis=DAVIS)")
        positive = (
            "batch_size", "lr", "seq_length", "mem_frames", "num_objects", "crop_size",
            "davis_repeat", "points", "save_every", "log_every",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise bad(name, getattr(self, name), "must be positive")
        if self.iterations is not None and self.iterations <= 0:
            raise bad("iterations", self.iterations, "must be positive")
        if self.stop_at is not None and self.stop_at <= 0:
            raise bad("stop_at", self.stop_at, "must be positive")
        if self.seq_length < 2:
            raise bad("seq_length", self.seq_length, "needs at least 2 frames (1 given + 1)")
        divisor = 32 if self.model == "s3-base" else 16
        if self.crop_size % divisor:
            raise bad("crop_size", self.crop_size, f"must be a multiple of {divisor}")
        if not self.max_skip or any(s < 1 for s in self.max_skip):
            raise bad("max_skip", _fmt(self.max_skip), "values must be >= 1")
        if len(self.max_skip_switch) != len(self.max_skip) - 1:
            raise bad(
                "max_skip_switch",
                _fmt(self.max_skip_switch),
                f"needs one switch point fewer than --max-skip has values "
                f"({len(self.max_skip) - 1})",
            )
        for name in ("max_skip_switch", "lr_steps"):
            fr = getattr(self, name)
            if any(not 0 <= f <= 1 for f in fr) or list(fr) != sorted(fr):
                raise bad(name, _fmt(fr), "fractions in [0, 1], increasing")
        for name in ("weight_decay", "embed_weight_decay", "clip_grad_norm", "backbone_lr_ratio"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), "must be >= 0")
        if not 0 <= self.drop_path < 1:
            raise bad("drop_path", self.drop_path, "must be in [0, 1)")
        for name in ("merge_prob", "deep_update_prob", "importance_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, getattr(self, name), "must be in [0, 1]")
        if not 0 < self.lr_gamma <= 1:
            raise bad("lr_gamma", self.lr_gamma, "must be in (0, 1]")
        if self.oversample_ratio < 1:
            raise bad("oversample_ratio", self.oversample_ratio, "must be >= 1")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise bad("amp_dtype", self.amp_dtype, "choose float16 or bfloat16")
        if self.workers < 0:
            raise bad("workers", self.workers, "must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (for checkpoints and logs)."""
        out = dataclasses.asdict(self)
        out["data"] = [dataclasses.asdict(d) for d in self.data]
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out


def _fmt(values: tuple) -> str:
    return ",".join(str(v) for v in values)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, hint: Any, where: str, base: Path | None) -> Any:
    """Check ``value`` against the field's type hint; returns the value in the field's form."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner, where, base)
    if name == "data":
        return _coerce_data(value, where, base)
    if origin is tuple:
        if name == "backbone" and isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: {name} must be a list (e.g. {name} = [1, 2])")
        return tuple(_coerce(name, v, args[0], where, base) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: {name} must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: {name} must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: {name} must be a number, not {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: {name} must be a string, not {value!r}")
        if name in ("output", "init", "backbone") and base is not None:
            p = Path(value).expanduser()
            return str(p if p.is_absolute() else base / p)
        return value
    raise InputError(f"{where}: {name} has an unsupported type")  # pragma: no cover


def _coerce_data(value: Any, where: str, base: Path | None) -> tuple[DataSpec, ...]:
    """``data = {davis = "DIR", ytvos = "DIR"}``, or ``data = ["davis=DIR", ...]``, or a list
    of tables ``[[data]] kind = "davis" root = "DIR" repeat = 5``."""
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    if not isinstance(value, list):
        raise InputError(f"{where}: data must be a table or a list (data = {{davis = \"DIR\"}})")
    specs = []
    for item in value:
        if isinstance(item, str):
            specs.append(parse_data_spec(item, base, f"{where}: data {item!r}"))
        elif isinstance(item, dict):
            known = {f.name for f in dataclasses.fields(DataSpec)}
            unknown = sorted(set(item) - known)
            if unknown:
                raise InputError(
                    f"{where}: unknown key {unknown[0]!r} in a [[data]] table (known: "
                    f"{', '.join(sorted(known))})"
                )
            if "kind" not in item or "root" not in item:
                raise InputError(f"{where}: a [[data]] table needs kind and root")
            text = f"{item['kind']}={item['root']}"
            spec = parse_data_spec(text, base, f"{where}: data {text!r}")
            for key in ("repeat", "frame_interval"):
                v = item.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise InputError(f"{where}: data {key} must be a positive integer")
            specs.append(dataclasses.replace(spec, repeat=item.get("repeat"),
                                             frame_interval=item.get("frame_interval")))
        else:
            raise InputError(f"{where}: data entries must be \"KIND=DIR\" strings or tables")
    return tuple(specs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into checked field values (relative paths are taken from the
    file's folder). Unknown keys and wrong types raise ``InputError``."""
    path = Path(path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError as exc:
            raise InputError(f"{path}: reading TOML on Python 3.10 needs tomli "
                             "(pip install tomli)") from exc
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from exc
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    hints = _field_types()
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise InputError(
            f"{path}: unknown key {unknown[0]!r} (check the spelling; known keys: "
            f"{', '.join(hints)})"
        )
    base = path.resolve().parent
    return {k: _coerce(k, v, hints[k], str(path), base) for k, v in raw.items()}


def merge_config(
    file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults <- config file values <- overrides (``None`` overrides are ignored; ``data``
    overrides are added to the file's datasets)."""
    values: dict[str, Any] = dict(file_values or {})
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k == "data":
            values["data"] = tuple(values.get("data", ())) + tuple(v)
        else:
            values[k] = v
    hints = _field_types()
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise InputError(f"{unknown[0]}: not a training setting")
    for k, v in values.items():
        if k != "data" and isinstance(v, list):
            values[k] = tuple(v)
    return TrainConfig(**values)


def field_default(name: str) -> Any:
    """The default of a field (for help texts)."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]

