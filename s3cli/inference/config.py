"""Options of the streaming engine, named as in the official evaluation config.

Defaults equal Cutie's ``cutie/config/eval_config.yaml`` (commit ``ec5cdd4``). ``max_internal_size``
stays -1 (off) here; the CLI chooses 480.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LongTermConfig", "InferenceConfig"]


def _check_names(cls: type, options: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unknown {where} option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


@dataclass(frozen=True)
class LongTermConfig:
    """Long-term memory (XMem-style consolidation), used only when ``use_long_term`` is set.

    Frame counts include the permanent first memory frame, as in the official config: working
    memory is compressed once its temporary part reaches ``max_mem_frames - 1`` frames, keeping
    the newest ``min_mem_frames - 1`` frames. Each compression turns the rest into
    ``num_prototypes`` tokens; a long-term bucket holding at least ``max_num_tokens -
    num_prototypes`` tokens first keeps only its ``max_num_tokens - num_prototypes -
    buffer_tokens`` most used ones.
    """

    count_usage: bool = True
    max_mem_frames: int = 10
    min_mem_frames: int = 5
    num_prototypes: int = 128
    max_num_tokens: int = 10000
    buffer_tokens: int = 2000

    def __post_init__(self) -> None:
        if self.min_mem_frames < 1:
            raise ValueError(f"long_term.min_mem_frames must be >= 1, got {self.min_mem_frames}")
        if self.max_mem_frames <= self.min_mem_frames:
            raise ValueError(
                "long_term.max_mem_frames must be greater than long_term.min_mem_frames, got "
                f"{self.max_mem_frames} <= {self.min_mem_frames}"
            )
        if self.num_prototypes < 1:
            raise ValueError(f"long_term.num_prototypes must be >= 1, got {self.num_prototypes}")
        if self.buffer_tokens < 0:
            raise ValueError(f"long_term.buffer_tokens must be >= 0, got {self.buffer_tokens}")
        if self.max_num_tokens - self.num_prototypes - self.buffer_tokens < 0:
            raise ValueError(
                "long_term.max_num_tokens must be at least num_prototypes + buffer_tokens, got "
                f"{self.max_num_tokens} < {self.num_prototypes} + {self.buffer_tokens}"
            )

    @classmethod
    def from_options(cls, options: LongTermConfig | Mapping[str, Any] | None) -> LongTermConfig:
        """A ``LongTermConfig`` from itself, a mapping of field names, or ``None`` (defaults)."""
        if options is None:
            return cls()
        if isinstance(options, LongTermConfig):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"long_term must be a LongTermConfig or a mapping, got {options!r}")
        _check_names(cls, options, "long_term")
        return cls(**dict(options))


@dataclass(frozen=True)
class InferenceConfig:
    """Per-video engine options.

    - ``mem_every``: memorise every this many frames (and every frame with a given mask).
    - ``top_k``: memory entries kept per query pixel in the memory read.
    - ``use_long_term`` / ``long_term``: bounded long-term memory; without it working memory
      keeps the permanent first frame plus the newest ``max_mem_frames - 1`` frames (FIFO).
    - ``stagger_updates``: how many of the ``mem_every`` frames update the sensory memory.
    - ``chunk_size``: objects processed together (-1: all).
    - ``max_internal_size``: shorter side limit for internal processing (-1: off); outputs are
      returned at the input size.
    - ``flip_aug``: average the prediction with that of the horizontally flipped frame.
    - ``readout``: ``dense`` (default) multiplies memory values by the dense top-k affinity
      as the official code does (in bounded blocks on long videos); ``sparse`` gathers only
      the top-k values of each query: far fewer operations, the same result within float
      rounding, but not the official order of sums (a near-tie may then decide otherwise).
    """

    mem_every: int = 5
    top_k: int = 30
    use_long_term: bool = False
    max_mem_frames: int = 5
    long_term: LongTermConfig = field(default_factory=LongTermConfig)
    stagger_updates: int = 5
    chunk_size: int = -1
    max_internal_size: int = -1
    flip_aug: bool = False
    readout: str = "dense"

    def __post_init__(self) -> None:
        if not isinstance(self.long_term, LongTermConfig):
            object.__setattr__(self, "long_term", LongTermConfig.from_options(self.long_term))
        if self.mem_every < 1:
            raise ValueError(f"mem_every must be >= 1, got {self.mem_every}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_mem_frames < 1:
            raise ValueError(f"max_mem_frames must be >= 1, got {self.max_mem_frames}")
        if self.stagger_updates < 1:
            raise ValueError(f"stagger_updates must be >= 1, got {self.stagger_updates}")
        if self.chunk_size == 0 or self.chunk_size < -1:
            raise ValueError(f"chunk_size must be -1 or >= 1, got {self.chunk_size}")
        if self.readout not in ("sparse", "dense"):
            raise ValueError(f"readout must be 'sparse' or 'dense', got {self.readout!r}")
        if self.max_internal_size == 0 or self.max_internal_size < -1:
            raise ValueError(f"max_internal_size must be -1 or >= 1, got {self.max_internal_size}")

    @classmethod
    def from_options(cls, **options: Any) -> InferenceConfig:
        """Build from keyword options named as in the official evaluation config.

        ``long_term`` may be a ``LongTermConfig`` or a mapping; unknown names raise ``TypeError``.
        """
        _check_names(cls, options, "inference")
        if "long_term" in options:
            options["long_term"] = LongTermConfig.from_options(options["long_term"])
        return cls(**options)

    def replace(self, **options: Any) -> InferenceConfig:
        """A copy with the given options changed (same names and checks as ``from_options``).

        A ``long_term`` mapping updates only the fields it names.
        """
        _check_names(type(self), options, "inference")
        long_term = options.get("long_term")
        if isinstance(long_term, Mapping):
            # A mapping changes only the named fields of the current long-term settings.
            _check_names(LongTermConfig, long_term, "long_term")
            options["long_term"] = dataclasses.replace(self.long_term, **dict(long_term))
        elif "long_term" in options:
            options["long_term"] = LongTermConfig.from_options(long_term)
        return dataclasses.replace(self, **options)
