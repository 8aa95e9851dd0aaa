"""OneDNNLinear: oneDNN's kernel for CPU float32 inference, a plain linear everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.layers.onednn_linear import (
    OneDNNLinear,
    onednn_linear_available,
    use_onednn_linears,
)
from s3cli.model.registry import build_network

needs_onednn = pytest.mark.skipif(
    not onednn_linear_available(), reason="this PyTorch build has no oneDNN"
)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.inner = nn.Sequential(nn.Linear(8, 4, bias=False), nn.ReLU())


@needs_onednn
def test_swap_keeps_parameters_and_state_dict() -> None:
    block = _Block()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    params = {id(p) for p in block.parameters()}
    assert use_onednn_linears(block) == 2  # MultiheadAttention's out_proj is left alone
    assert type(block.fc) is OneDNNLinear and type(block.inner[0]) is OneDNNLinear
    assert type(block.attn.out_proj) is not OneDNNLinear
    assert {id(p) for p in block.parameters()} == params  # shared, not copied
    after = block.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k


@needs_onednn
def test_inference_equals_f_linear_and_uses_onednn() -> None:
    torch.manual_seed(0)
    lin = OneDNNLinear(64, 48)
    x = torch.randn(3, 37, 64)
    with torch.inference_mode():
        ours = lin(x)
    torch.testing.assert_close(ours, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    with torch.profiler.profile() as prof, torch.inference_mode():
        lin(x)
    names = {e.name for e in prof.events()}
    assert "mkldnn::_linear_pointwise" in names, names
    assert "aten::addmm" not in names


@needs_onednn
def test_training_and_fp16_autocast_take_the_plain_path() -> None:
    torch.manual_seed(0)
    lin = OneDNNLinear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).sum().backward()  # gradients flow as through nn.Linear, under autocast too
    assert x.grad is not None and lin.weight.grad is not None
    with torch.profiler.profile() as prof, torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            y = lin(x)
    assert y.dtype == torch.float16
    assert "mkldnn::_linear_pointwise" not in {e.name for e in prof.events()}
    assert "_packed_bf16" not in lin.__dict__


@needs_onednn
def test_bf16_autocast_runs_a_packed_bf16_copy() -> None:
    """Under bf16 autocast at inference: oneDNN on a cached packed bf16 weight, outputs equal
    to autocast's F.linear, the copy refreshed when the weight changes."""
    torch.manual_seed(0)
    lin = OneDNNLinear(64, 48)
    x = torch.randn(2, 37, 64)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return lin(x), F.linear(x, lin.weight, lin.bias)

    ours, ref = run()
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    packed = lin.__dict__["_packed_bf16"][1][0]
    with torch.profiler.profile() as prof:
        run()
    names = [e.name for e in prof.events()]
    assert names.count("mkldnn::_linear_pointwise") == 1
    assert lin.__dict__["_packed_bf16"][1][0] is packed  # reused, not packed again
    with torch.no_grad():
        lin.weight.mul_(-2.0)
    ours, ref = run()
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # a stale copy would differ in sign
    assert list(lin.state_dict()) == ["weight", "bias"]  # the copy is not state


@needs_onednn
def test_networks_are_built_with_onednn_linears() -> None:
    net = build_network("cutie-small", synthetic=True)
    kinds = {type(m) for m in net.modules() if isinstance(m, nn.Linear)}
    assert OneDNNLinear in kinds
    assert nn.Linear not in kinds  # every plain linear was swapped
