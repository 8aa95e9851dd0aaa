"""Whole-run parity with the official Cutie ``InferenceCore`` (shared/fixtures/cutie/run_*.npz).

Each run is replayed frame by frame with ``Tracker`` on the synthetic-weight networks; the
probabilities must agree within 1e-4 (max abs) and the per-frame bookkeeping recorded in the
manifest (segmentation, memory writes, sensory updates, memory sizes, compressions, channel
order) must be identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from s3cli.inference import Tracker
from s3cli.inference.memory import (
    ConsolidationEvent,
    EvictionEvent,
    MemoryEvent,
    do_softmax,
    get_similarity,
    read_values,
)
from s3cli.model.registry import build_network
from tests.conftest import FIXTURES, assert_close, load_npz, require_shared

CUTIE = FIXTURES / "cutie"
RUNS = ["run_workmem", "run_longterm", "run_longterm_evict", "run_addobj", "run_small_workmem"]
MODELS = {"base": "cutie-base", "small": "cutie-small"}
PROB_TOL = 1e-4


class RecordingNetwork:
    """Passes everything to the network and logs the decisions the engine makes."""

    def __init__(self, network: Any) -> None:
        self._network = network
        self.log: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)

    def encode_mask(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append(("encode_mask", True))
        return self._network.encode_mask(*args, **kwargs)

    def segment(self, *args: Any, update_sensory: bool = True, **kwargs: Any) -> Any:
        self.log.append(("segment", update_sensory))
        return self._network.segment(*args, update_sensory=update_sensory, **kwargs)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads(require_shared(CUTIE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return load_npz(CUTIE / "inputs.npz")


@pytest.fixture(scope="module")
def networks() -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def get(config_name: str) -> Any:
        if config_name not in cache:
            cache[config_name] = build_network(MODELS[config_name], synthetic=True)
        return cache[config_name]

    return get


def _work_mem(tracker: Tracker) -> dict[str, dict[str, Any]]:
    return {
        str(bid): {
            "objects": list(b.object_ids),
            "size": b.work_size,
            "perm_size": b.work_perm_size,
        }
        for bid, b in tracker.memory.stats().buckets.items()
    }


def _long_mem(tracker: Tracker) -> dict[str, dict[str, int]]:
    return {
        str(bid): {"size": b.long_size}
        for bid, b in tracker.memory.stats().buckets.items()
        if b.long_size > 0
    }


@pytest.mark.parametrize("run", RUNS)
def test_inference_core_run(
    run: str,
    manifest: dict[str, Any],
    inputs: dict[str, np.ndarray],
    networks: Callable[[str], Any],
) -> None:
    spec = manifest["runs"][run]
    ref = load_npz(CUTIE / f"{run}.npz")
    settings = {k: v for k, v in spec["settings"].items() if k not in ("save_aux", "amp")}
    network = RecordingNetwork(networks(spec["model_config"]))
    tracker = Tracker(network, **settings)
    events: list[tuple[int, MemoryEvent]] = []
    tracker.memory.listeners.append(lambda e: events.append((tracker.frame_index, e)))

    for t, frame in enumerate(spec["per_frame"]):
        schedule = spec["mask_schedule"].get(str(t))
        network.log.clear()
        num_events = len(events)
        if schedule is not None:
            mask = inputs[schedule["mask_array"]].astype(np.int64)
            prob = tracker.step(inputs["frames"][t], mask, schedule["objects"], end=frame["end"])
        else:
            prob = tracker.step(inputs["frames"][t], end=frame["end"])

        where = f"{run} frame {t}"
        assert tracker.object_ids == frame["object_ids_in_channel_order"], where
        expected = ref[f"prob_{t}"]
        assert tuple(prob.shape) == expected.shape, where
        diff = float(np.abs(prob.numpy().astype(np.float64) - expected).max())
        assert diff <= PROB_TOL, f"{where}: max abs probability diff {diff:.3g}"

        segments = [flag for name, flag in network.log if name == "segment"]
        assert bool(segments) == frame["segmented"], where
        if frame["segmented"]:
            assert segments == [frame["update_sensory_in_segment"]], where
        assert any(n == "encode_mask" for n, _ in network.log) == frame["memory_added"], where
        assert _work_mem(tracker) == frame["work_mem"], where
        if frame.get("long_mem") is not None:
            assert _long_mem(tracker) == frame["long_mem"], where

        new_events = [e for _, e in events[num_events:]]
        consolidations = [e for e in new_events if isinstance(e, ConsolidationEvent)]
        evictions = [e for e in new_events if isinstance(e, EvictionEvent)]
        assert [e.bucket_id for e in consolidations] == frame["compressed_buckets"], where
        for ours, theirs in zip(consolidations, frame["consolidation"], strict=True):
            assert ours.candidate_usage.shape[-1] == theirs["num_candidates"], where
            assert ours.prototype_indices.shape[-1] == theirs["num_prototypes"], where
        assert [(e.bucket_id, e.survivors.shape[-1]) for e in evictions] == [
            (c["bucket"], c["keep"]) for c in frame["remove_obsolete_calls"]
        ], where

    if run == "run_longterm_evict":
        assert tracker.memory.long is not None
        bucket = tracker.memory.long.buckets[0]
        assert_close(bucket.key, ref["final_long_key_b0"], name="final_long_key_b0")
        assert_close(bucket.shrinkage, ref["final_long_shrinkage_b0"], name="long shrinkage")
        assert_close(bucket.use_count, ref["final_long_use_cnt_b0"], name="long use count")
        assert_close(bucket.life_count, ref["final_long_life_cnt_b0"], name="long life count")
        for obj in (1, 2):
            assert_close(bucket.values[obj], ref[f"final_long_value_obj{obj}"], name=f"obj{obj}")


def test_output_mask_of_a_run(
    inputs: dict[str, np.ndarray], networks: Callable[[str], Any]
) -> None:
    """The index-mask helper maps channels back to the user's (non-contiguous) ids."""
    tracker = Tracker(networks("base"), mem_every=2, max_mem_frames=3)
    mask = inputs["mask_2obj"].astype(np.int64)
    relabelled = np.select([mask == 1, mask == 2], [17, 5], 0)
    prob = tracker.step(inputs["frames"][0], relabelled)
    assert tracker.object_ids == [5, 17]
    assert np.array_equal(tracker.to_index_mask(prob).numpy(), relabelled)
    prob = tracker.step(inputs["frames"][1])
    index = tracker.to_index_mask(prob)
    assert set(torch.unique(index).tolist()) <= {0, 5, 17}


def test_memory_read_reproduces_the_frame1_stage() -> None:
    """Similarity, top-30 affinity and visual readout from the recorded frame-0/1 tensors (the
    engine's own maths, independent of the network)."""
    ref = load_npz(CUTIE / "stages.npz")
    t = {k: torch.from_numpy(v) for k, v in ref.items()}
    with torch.inference_mode():
        sim = get_similarity(
            t["f0_key"].flatten(2), t["f0_shrinkage"].flatten(2), t["f1_key"], t["f1_selection"]
        )
        assert_close(sim, ref["f1_similarity"], name="similarity")
        affinity = do_softmax(t["f1_similarity"].clone(), top_k=30)
        assert_close(affinity, ref["f1_affinity"], name="affinity")
        assert torch.equal(affinity > 0, t["f1_affinity"] > 0)  # the same 30 entries
        value = t["f0_msk_value"].flatten(3)  # (1, N, C, HW)
        readout = read_values(t["f1_affinity"], value).view(1, 2, 256, 8, 14)
        assert_close(readout, ref["f1_visual_readout"], name="visual readout")
