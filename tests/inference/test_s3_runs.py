"""Whole-run parity with the official S3 ``InferenceCore`` (shared/fixtures/s3/run_*.npz).

Probabilities within 1e-4 (max abs); per-frame decisions and memory sizes as recorded; every
consolidation and long-term eviction in the recorded order, with the chosen prototype indices
and the surviving indices identical.
"""

from __future__ import annotations

import json
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
from tests.conftest import FIXTURES, assert_close_elementwise, load_npz, require_shared
from tests.inference.test_cutie_runs import RecordingNetwork

S3 = FIXTURES / "s3"
RUNS = ["A", "B", "C", "D"]
MASK_ARRAYS = {0: "mask0", 5: "mask5"}
PROB_TOL = 1e-4
FLOAT_TOL = 1e-3  # the S3 fixtures' suggested |ours - ref| <= 1e-3 * (1 + |ref|)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads(require_shared(S3 / "manifest.json").read_text())


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return load_npz(S3 / "inputs.npz")


@pytest.fixture(scope="module")
def network() -> Any:
    require_shared(S3)
    return build_network("s3-base", synthetic=True)


def _check_events(
    run: str,
    ref: dict[str, np.ndarray],
    spec: dict[str, Any],
    events: list[tuple[int, MemoryEvent]],
) -> None:
    recorded = spec.get("events", [])
    kinds = {"consolidation": ConsolidationEvent, "remove_obsolete": EvictionEvent}
    assert [(t, type(e)) for t, e in events] == [(r["t"], kinds[r["event"]]) for r in recorded]
    for j, (t, event) in enumerate(events):
        where = f"run {run} event {j} (frame {t})"
        if isinstance(event, ConsolidationEvent):
            assert int(ref[f"cons{j}_t"]) == t, where
            assert event.prototype_indices.shape[0] == 1, where
            assert np.array_equal(event.prototype_indices[0].numpy(), ref[f"cons{j}_proto_idx"]), (
                f"{where}: prototype indices differ"
            )
            assert_close_elementwise(
                event.candidate_usage, ref[f"cons{j}_usage"], tol=FLOAT_TOL, name=where
            )
            assert_close_elementwise(
                event.prototype_key, ref[f"cons{j}_proto_key"], tol=FLOAT_TOL, name=where
            )
            assert_close_elementwise(
                event.prototype_shrinkage,
                ref[f"cons{j}_proto_shrinkage"],
                tol=FLOAT_TOL,
                name=where,
            )
            values = torch.stack(list(event.prototype_values.values()), dim=1)  # (B, N, C, P)
            assert_close_elementwise(values, ref[f"cons{j}_proto_value"], tol=FLOAT_TOL, name=where)
        else:
            assert isinstance(event, EvictionEvent)
            assert int(ref[f"obs{j}_t"]) == t, where
            assert np.array_equal(event.survivors[0].numpy(), ref[f"obs{j}_survivors"]), (
                f"{where}: surviving indices differ"
            )
            assert_close_elementwise(event.usage, ref[f"obs{j}_usage"], tol=FLOAT_TOL, name=where)
    stored = {k.split("_")[0] for k in ref if k.startswith(("cons", "obs"))}
    assert len(stored) == len(events), f"run {run}: {len(stored)} events stored"


@pytest.mark.parametrize("run", RUNS)
def test_inference_core_run(
    run: str, manifest: dict[str, Any], inputs: dict[str, np.ndarray], network: Any
) -> None:
    spec = manifest["runs"][f"run_{run}.npz"]
    ref = load_npz(S3 / f"run_{run}.npz")
    settings = {k: v for k, v in spec["config"].items() if k not in ("save_aux", "amp")}
    recorder = RecordingNetwork(network)
    tracker = Tracker(recorder, **settings)
    events: list[tuple[int, MemoryEvent]] = []
    tracker.memory.listeners.append(lambda e: events.append((tracker.frame_index, e)))
    num_frames = len(spec["flags"])
    order: list[int] = []

    for t in range(num_frames):
        recorder.log.clear()
        end = t == num_frames - 1
        objects = spec["masks_given"].get(str(t))
        if objects is not None:
            mask = inputs[MASK_ARRAYS[t]].astype(np.int64)
            prob = tracker.step(inputs["frames"][t], mask, objects, end=end)
            order += [obj for obj in objects if obj not in order]
        else:
            prob = tracker.step(inputs["frames"][t], end=end)

        where = f"run {run} frame {t}"
        assert tracker.object_ids == order, where
        expected = ref[f"prob_{t}"]
        assert tuple(prob.shape) == expected.shape, where
        diff = float(np.abs(prob.numpy().astype(np.float64) - expected).max())
        assert diff <= PROB_TOL, f"{where}: max abs probability diff {diff:.3g}"

        flags = spec["flags"][t]
        assert any(n == "encode_mask" for n, _ in recorder.log) == flags["is_mem_frame"], where
        segments = [flag for name, flag in recorder.log if name == "segment"]
        assert any(segments) == flags["update_sensory"], where

        after = spec["memory_after_step"][t]
        assert tracker.frame_index == after["curr_ti"], where
        assert tracker.state.last_mem_index == after["last_mem_ti"], where
        stats = tracker.memory.stats().buckets
        assert {
            str(bid): {"size": b.work_size, "perm": b.work_perm_size, "objects": list(b.object_ids)}
            for bid, b in stats.items()
        } == after["work_mem"], where
        if "long_mem" in after:
            long_sizes = {
                str(bid): {"size": b.long_size} for bid, b in stats.items() if b.long_size > 0
            }
            assert long_sizes == after["long_mem"], where

    _check_events(run, ref, spec, events)


def test_memory_read_reproduces_the_frame1_stage() -> None:
    """Expanded three-term similarity, top-30 affinity (no max subtraction) and visual readout
    from the recorded tensors (the engine's own maths, independent of the network)."""
    ref = load_npz(S3 / "stage_f1.npz")
    value = torch.from_numpy(load_npz(S3 / "stage_f0.npz")["mask_value"]).flatten(3)
    t = {k: torch.from_numpy(ref[k]) for k in ("mem_key", "mem_shrinkage", "key", "selection")}
    with torch.inference_mode():
        sim = get_similarity(t["mem_key"], t["mem_shrinkage"], t["key"], t["selection"])
        assert float((sim - torch.from_numpy(ref["similarity"])).abs().max()) <= 5e-3
        affinity = do_softmax(torch.from_numpy(ref["similarity"]).clone(), top_k=30)
        assert_close_elementwise(affinity, ref["affinity"], tol=FLOAT_TOL, name="affinity")
        assert torch.equal(affinity > 0, torch.from_numpy(ref["affinity"]) > 0)
        readout = read_values(torch.from_numpy(ref["affinity"]), value)
        assert_close_elementwise(
            readout.view(ref["visual_readout"].shape),
            ref["visual_readout"],
            tol=FLOAT_TOL,
            name="visual readout",
        )
