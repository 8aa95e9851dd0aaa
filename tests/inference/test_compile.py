"""``torch.compile``d network stages (``--compile``) give the eager network's results."""

from __future__ import annotations

import numpy as np
import torch

from s3cli.api import SegmentOptions, make_tracker
from s3cli.inference import Tracker
from s3cli.model.network import VOSNetwork
from s3cli.model.registry import build_network


def _frames(count: int, height: int = 64, width: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return [np.roll(base, 3 * t, axis=1) for t in range(count)]


def _mask(height: int = 64, width: int = 96) -> np.ndarray:
    mask = np.zeros((height, width), np.int64)
    mask[16:48, 20:50] = 1
    mask[10:30, 60:90] = 2
    return mask


def test_compile_stages_wraps_every_stage_once() -> None:
    net = build_network("cutie-small", synthetic=True).eval()
    eager = {name: getattr(net, name) for name in VOSNetwork.STAGES}
    net.compile_stages()
    compiled = {name: getattr(net, name) for name in VOSNetwork.STAGES}
    for name in VOSNetwork.STAGES:
        assert compiled[name] is not eager[name]
        assert getattr(compiled[name], "_torchdynamo_orig_callable", None) is not None, name
    net.compile_stages()  # idempotent: not compiled twice over
    assert all(getattr(net, n) is compiled[n] for n in VOSNetwork.STAGES)


def test_segment_options_compile_reaches_the_network(tmp_path) -> None:
    net = build_network("cutie-small", synthetic=True).eval()
    make_tracker(net, "cutie-small", SegmentOptions(source=tmp_path, compile=True))
    assert getattr(net.segment, "_torchdynamo_orig_callable", None) is not None
    plain = build_network("cutie-small", synthetic=True).eval()
    make_tracker(plain, "cutie-small", SegmentOptions(source=tmp_path))
    assert getattr(plain.segment, "_torchdynamo_orig_callable", None) is None


def test_compiled_tracker_matches_eager() -> None:
    """Two objects over four frames (memorised every second frame): same probabilities.

    The fused oneDNN paths (OneDNNLinear, conv_bn) step aside while torch.compile traces."""
    torch.manual_seed(0)
    net = build_network("cutie-small", synthetic=True).eval()
    frames, mask = _frames(4), _mask()

    def run() -> list[torch.Tensor]:
        tracker = Tracker(net, mem_every=2, max_internal_size=-1)
        with torch.inference_mode():
            return [tracker.step(f, mask if t == 0 else None) for t, f in enumerate(frames)]

    eager = run()
    net.compile_stages(dynamic=False)
    compiled = run()
    for t, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"frame {t}")
