"""InferenceConfig: official defaults, option names, validation."""

from __future__ import annotations

import dataclasses

import pytest

from s3cli.inference.config import InferenceConfig, LongTermConfig


def test_defaults_equal_official_eval_config() -> None:
    # cutie/config/eval_config.yaml at ec5cdd4 (max_internal_size -1: the CLI sets 480).
    cfg = InferenceConfig()
    assert (cfg.mem_every, cfg.top_k, cfg.stagger_updates, cfg.chunk_size) == (5, 30, 5, -1)
    assert (cfg.max_internal_size, cfg.use_long_term, cfg.max_mem_frames) == (-1, False, 5)
    assert cfg.flip_aug is False
    assert cfg.long_term == LongTermConfig(
        count_usage=True,
        max_mem_frames=10,
        min_mem_frames=5,
        num_prototypes=128,
        max_num_tokens=10000,
        buffer_tokens=2000,
    )


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        InferenceConfig().top_k = 3  # type: ignore[misc]


def test_from_options_accepts_long_term_mapping() -> None:
    cfg = InferenceConfig.from_options(
        mem_every=2, use_long_term=True, long_term={"max_mem_frames": 3, "min_mem_frames": 1}
    )
    assert cfg.mem_every == 2
    assert cfg.long_term.max_mem_frames == 3 and cfg.long_term.min_mem_frames == 1
    assert cfg.long_term.num_prototypes == 128  # untouched fields keep the defaults


def test_replace_merges_long_term_mapping() -> None:
    cfg = InferenceConfig(long_term=LongTermConfig(num_prototypes=16))
    new = cfg.replace(long_term={"buffer_tokens": 8})
    assert new.long_term.num_prototypes == 16 and new.long_term.buffer_tokens == 8
    assert cfg.long_term.buffer_tokens == 2000


def test_unknown_options_are_named() -> None:
    with pytest.raises(TypeError, match="mem_evry"):
        InferenceConfig.from_options(mem_evry=3)
    with pytest.raises(TypeError, match="max_tokens"):
        InferenceConfig().replace(long_term={"max_tokens": 3})


@pytest.mark.parametrize(
    "options",
    [
        {"mem_every": 0},
        {"top_k": 0},
        {"chunk_size": 0},
        {"max_internal_size": 0},
        {"long_term": {"max_mem_frames": 3, "min_mem_frames": 3}},
        {"long_term": {"max_num_tokens": 10, "num_prototypes": 8, "buffer_tokens": 4}},
    ],
)
def test_invalid_values(options: dict) -> None:
    with pytest.raises(ValueError):
        InferenceConfig.from_options(**options)
