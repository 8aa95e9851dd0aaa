"""bf16 autocast on the CPU: the network runs in bf16, the memory readout stays float32."""

from __future__ import annotations

import numpy as np
import torch

from s3cli.inference.engine import Tracker
from s3cli.inference.memory import MemoryManager
from s3cli.model.registry import build_network
from tests.conftest import FIXTURES, load_npz


def test_bf16_run_close_to_fp32_and_readout_in_fp32(monkeypatch) -> None:
    inputs = load_npz(FIXTURES / "cutie" / "inputs.npz")
    net = build_network("cutie-small", synthetic=True)
    seen: list[torch.dtype] = []
    original = MemoryManager._affinity_fp32

    def spy(self, bucket_id, query_key, query_selection):
        out = original(self, bucket_id, query_key, query_selection)
        seen.append(out.weights.dtype)
        return out

    monkeypatch.setattr(MemoryManager, "_affinity_fp32", spy)
    probs = {}
    for precision in ("fp32", "bf16"):
        tracker = Tracker(net, mem_every=2)
        out = []
        for t in range(4):
            mask = inputs["mask_2obj"].astype(np.int64) if t == 0 else None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out.append(tracker.step(inputs["frames"][t], mask, end=t == 3))
        probs[precision] = torch.stack(out)
    assert seen and all(d == torch.float32 for d in seen)
    bf16 = probs["bf16"]
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16.sum(1), torch.ones_like(bf16.sum(1)), atol=1e-4, rtol=0)
    # The annotated frame comes from the mask alone: identical in both precisions.
    torch.testing.assert_close(bf16[0], probs["fp32"][0])
    # Later frames were really computed in bf16 (synthetic weights exaggerate the difference;
    # accuracy in bf16 is measured with the lite model on real data: benchmarks/lite_davis.py
    # --precision bf16).
    assert not torch.equal(bf16[1:], probs["fp32"][1:])


def test_object_summaries_stay_float32_under_autocast() -> None:
    """As in the official code, the object summariser's prediction heads and pooling run in
    float32 under autocast (also inside a dispatch mode such as the FLOP counter, where mixed
    bf16/float32 operands used to fail)."""
    from torch.utils.flop_counter import FlopCounterMode

    from s3cli.model.transformer.object_summarizer import ObjectSummarizer

    torch.manual_seed(0)
    summarizer = ObjectSummarizer(
        value_dim=32, embed_dim=16, num_summaries=8, pe_scale=32.0, pe_temperature=10000.0
    ).eval()
    masks = (torch.rand(1, 2, 32, 48) > 0.5).float()
    value = torch.randn(1, 2, 32, 8, 12)
    with torch.inference_mode():
        ref, _ = summarizer(masks, value)
        with torch.autocast("cpu", dtype=torch.bfloat16), FlopCounterMode(display=False):
            out, _ = summarizer(masks, value)
    assert out.dtype == torch.float32
    # Only the input projection ran in bf16: the result is close to the float32 one.
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, caplog) -> None:
    import s3cli.api as api

    for native, warned in ((False, True), (True, False)):
        monkeypatch.setattr(api, "cpu_has_bf16_matmul", lambda native=native: native)
        caplog.clear()
        with caplog.at_level("WARNING", logger="s3cli.api"):
            ctx = api._autocast("cpu", "bf16")
        assert isinstance(ctx, torch.autocast)
        assert any("no bf16 matrix instructions" in r.message for r in caplog.records) is warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="s3cli.api"):
        api._autocast("cpu", "fp32")
    assert not caplog.records


def test_bf16_instruction_check_agrees_with_cpuinfo() -> None:
    from pathlib import Path

    import pytest

    from s3cli.api import cpu_has_bf16_matmul

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert cpu_has_bf16_matmul() == bool({"avx512_bf16", "amx_tile"} & flags)
