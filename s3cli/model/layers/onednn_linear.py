"""Linear layers on oneDNN's float32 kernel for CPU inference.

``nn.Linear`` on CPU goes through ``addmm`` (MKL), which takes its AVX2 path on AMD CPUs and,
for 3-d inputs, copies its result once more into the output. oneDNN's linear runs the same
product faster: the S3 image encoder takes 15-20% less time at 480p (measured on this project's
2-core AMD machine with the weight passed as is; packing it once into oneDNN's blocked layout was
no faster there and would keep a second copy of every weight).

:class:`OneDNNLinear` is an ``nn.Linear`` (same parameters, same ``state_dict``) that takes that
kernel when it applies (CPU, float32, no autocast, no gradient wanted, not being traced by
``torch.compile``) and ``F.linear`` otherwise, so training and other devices see a plain
linear layer. :func:`use_onednn_linears` swaps it in for every plain ``nn.Linear`` of a built
network. Results equal ``F.linear``'s to float32 rounding (a different summation order).

Under CPU bf16 autocast, ``F.linear`` casts the float32 weight to bf16 on every call (a pass over
every weight per frame) and runs at 330-390 GFLOP/s on the ViT-B shapes of a 480p frame (2-core
AMD machine with AVX512-BF16, whose bf16 matmul peaks at ~445). :class:`OneDNNLinear` keeps a
bf16 copy of its weight packed in oneDNN's blocked layout instead (computed on first use, cached
until the weight changes, not in ``state_dict``; half the float32 weight's size) and runs
oneDNN's linear on it: 430-445 GFLOP/s on the same shapes, and bit-identical outputs to
autocast's ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.layers.derived import cached_derived

__all__ = ["OneDNNLinear", "onednn_linear_available", "use_onednn_linears"]


def onednn_linear_available() -> bool:
    """True when this PyTorch build has oneDNN and its linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose CPU float32 inference runs oneDNN's linear."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> OneDNNLinear:
        """A ``OneDNNLinear`` sharing ``linear``'s parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._onednn_kernel(x)
        if kernel == "fp32":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if kernel == "bf16":
            sources = [self.weight, self.bias]
            weight, bias = cached_derived(self, "_packed_bf16", sources, self._pack_bf16)
            x = x.to(torch.bfloat16)
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _onednn_kernel(self, x: torch.Tensor) -> str | None:
        """``"fp32"`` (float32 operands, no autocast) or ``"bf16"`` (float32 or bf16 operands
        under bf16 autocast) for CPU inference with no gradient wanted and no ``torch.compile``
        tracing (inductor picks its own kernels); ``None``: plain ``F.linear``."""
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return None
        if not torch.is_autocast_enabled("cpu"):
            return "fp32" if x.dtype == self.weight.dtype == torch.float32 else None
        operands = (torch.float32, torch.bfloat16)
        if torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in operands:
            return "bf16" if self.weight.dtype in operands else None
        return None

    @torch.no_grad()
    def _pack_bf16(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight in bf16, reordered to oneDNN's blocked layout; the bias in bf16."""
        weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.to(torch.bfloat16), None)
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return weight, bias


def use_onednn_linears(module: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` in ``module`` by a :class:`OneDNNLinear` (in place).

    Subclasses of ``nn.Linear`` (such as ``nn.MultiheadAttention``'s ``out_proj``, whose weight
    is read directly) are left alone. Does nothing where oneDNN is missing. Returns the number
    of layers replaced.
    """
    if not onednn_linear_available():
        return 0
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, OneDNNLinear.from_linear(child))
                replaced += 1
    return replaced
