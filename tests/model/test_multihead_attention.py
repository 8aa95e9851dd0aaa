"""multihead_attention: nn.MultiheadAttention's result without its batched-weight detour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s3cli.model.transformer.attention import multihead_attention


def _module(dim: int = 32, heads: int = 4) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(std=dim**-0.5)
    return mha


@pytest.mark.parametrize("shared", ["self", "cross"])
def test_equals_the_module(shared: str) -> None:
    mha = _module()
    x = torch.randn(3, 50, 32)
    pe = torch.randn(3, 50, 32)
    mem = torch.randn(3, 7, 32)
    with torch.no_grad():
        if shared == "self":  # q = k = x + pe, v = x (the object transformer's self-attention)
            qk = x + pe
            ref = mha(qk, qk, x, need_weights=False)[0]
            ours = multihead_attention(mha, qk, qk, x)
        else:  # with a boolean mask per (batch x head)
            mask = torch.rand(3 * 4, 50, 7) > 0.7
            mask[..., 0] = False  # every query sees at least one key
            ref = mha(x, mem + 1, mem, attn_mask=mask, need_weights=False)[0]
            ours = multihead_attention(mha, x, mem + 1, mem, mask)
    assert ours.shape == ref.shape == (3, 50, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_allocates_no_expanded_weight() -> None:
    """1620 pixels x 3 objects, E = 256 (cutie-base at 480p): the module materialises a
    1620 x 256 x 256 bf16 weight (202 MiB) per projection under CPU autocast; this does not."""
    mha = _module(256, 8)
    x = torch.randn(3, 1620, 256)
    mem = torch.randn(3, 16, 256)

    def largest_allocation(fn) -> float:
        with torch.profiler.profile(profile_memory=True) as prof, torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fn()
        return out, max(e.cpu_memory_usage for e in prof.events()) / 2**20

    module, module_peak = largest_allocation(lambda: mha(x, mem, mem, need_weights=False)[0])
    ours, peak = largest_allocation(lambda: multihead_attention(mha, x, mem, mem))
    assert module_peak > 150  # what the module does here (if PyTorch fixes it, this test says so)
    assert peak < 8, f"largest allocation {peak:.1f} MiB"
    with torch.no_grad():
        full = mha(x, mem, mem, need_weights=False)[0]  # float32
    scale = float(full.abs().max())
    for out in (ours, module):  # both within bf16 rounding of the float32 result
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), full, rtol=0.02, atol=0.02 * scale)
