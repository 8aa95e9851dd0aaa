"""Convolution + batch norm (+ residual) (+ ReLU) as one operation at inference.

In inference a batch norm with running statistics is an affine map per channel, so it folds
into the convolution before it: ``W' = W * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``. The ResNet trunks (Cutie's pixel and mask encoders) and S3's
spatial prior module then run one convolution where they ran a convolution, a batch norm, a
residual add and a ReLU, each of the last three a full pass over a large activation. On CPU in
float32 the convolution, the residual add and the ReLU go to oneDNN as one primitive
(``mkldnn::_convolution_pointwise``, the fused kernel ``torch.compile`` uses). Under CPU bf16
autocast the same primitive runs on bf16 operands with the folded weight cast to bf16 once and
cached (autocast's ``F.conv2d`` casts it on every call), the add fused where the input is
channels-last (oneDNN fuses it only there in bf16): Cutie-base's bf16 frame takes ~5% less
time (no separate add and ReLU passes), and the result equals autocast's module-by-module one
to bf16 rounding. Elsewhere the folded convolution runs through ``F.conv2d``.

The modules stay as they are (``nn.Conv2d`` and ``nn.BatchNorm2d`` with their own parameters and
``state_dict`` keys); :func:`conv_bn` only changes how they are evaluated. The folded weights
are computed once and cached on the batch norm, keyed on the versions of the tensors they come
from, so loading a checkpoint or moving the model invalidates them. While the batch norm
trains, a gradient is wanted or ``torch.compile`` traces it, :func:`conv_bn` evaluates the
modules one by one as written.
Results equal the unfused ones to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.layers.derived import cached_derived

__all__ = ["bn_scale", "conv_bn", "conv_bn_sequential", "fold_conv_bn"]


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel scale of ``bn`` in eval mode, ``gamma / sqrt(var + eps)``, float32
    ``(C,)``; ``bn(x) = (x - mean) * scale + beta``."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("cannot fold a batch norm without running statistics")
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    return scale if bn.weight is None else scale * bn.weight.float()


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of the one convolution equal to ``bn(conv(x))`` in eval mode."""
    with torch.no_grad():
        scale = bn_scale(bn)
        shift = -bn.running_mean.float() * scale
        if conv.bias is not None:
            shift = shift + conv.bias.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        weight = conv.weight.float() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        return weight.to(conv.weight.dtype).contiguous(), shift.to(conv.weight.dtype)


def _sources(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> list[torch.Tensor | None]:
    """The tensors a folded weight is derived from (what invalidates its cache)."""
    if bn is None:
        return [conv.weight, conv.bias]
    return [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    return cached_derived(bn, "_folded_conv", _sources(conv, bn), lambda: fold_conv_bn(conv, bn))


def _can_fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False  # traced by torch.compile: inductor folds and fuses in its own way
    if bn is not None and (bn.training or bn.running_mean is None):
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    params = [*conv.parameters(), *(bn.parameters() if bn is not None else ())]
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in params)
    )
    return not wants_grad


def _onednn_kernel(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
) -> str | None:
    """Which oneDNN primitive can run the folded convolution as one operation: ``"fp32"``
    (float32 operands, no autocast), ``"bf16"`` (float32 or bf16 operands under CPU bf16
    autocast; with a residual only for channels-last inputs, the one layout oneDNN fuses the
    add into in bf16), or ``None``."""
    if x.device.type != "cpu" or x.dim() != 4 or not torch.backends.mkldnn.is_available():
        return None
    # The fused add wants the residual laid out as the output will be (as the input).
    fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    if not torch.is_autocast_enabled("cpu"):
        if x.dtype != torch.float32 or weight.dtype != torch.float32:
            return None
        if residual is None:
            return "fp32"
        fused_add = residual.dtype == torch.float32 and residual.is_contiguous(memory_format=fmt)
        return "fp32" if fused_add else None
    operands = (torch.float32, torch.bfloat16)
    if torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return None
    if x.dtype not in operands or weight.dtype not in operands:
        return None
    if residual is None:
        return "bf16"
    return "bf16" if residual.dtype in operands and fmt == torch.channels_last else None


def _bf16_weights(
    conv: nn.Conv2d, bn: nn.BatchNorm2d | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (folded) weight, channels-last, and bias in bf16, cached on the batch norm (else the
    convolution) until a source tensor changes: autocast would cast them on every call."""

    def make() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = (conv.weight, conv.bias) if bn is None else _folded(conv, bn)
        with torch.no_grad():
            # Channels-last weights: oneDNN's bf16 kernels take them 5-10% faster here.
            w16 = weight.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            return w16, None if bias is None else bias.to(torch.bfloat16)

    owner = bn if bn is not None else conv
    return cached_derived(owner, "_conv_bf16", _sources(conv, bn), make)


def _output_shape(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, ...]:
    size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(
            x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    ]
    return (x.shape[0], conv.out_channels, *size)


def conv_bn(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d | None,
    x: torch.Tensor,
    *,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``relu?(bn?(conv(x)) + residual?)``, folded and fused where inference allows it.

    ``bn`` may be ``None`` (a plain convolution with its add and ReLU fused).
    Shapes: ``x`` (B, Cin, H, W), ``residual`` (B, Cout, H', W') as the convolution's output.
    """
    if not _can_fuse(conv, bn, x):
        out = conv._conv_forward(x, conv.weight, conv.bias)  # Conv2d's own forward, 4-d
        if bn is not None:
            out = bn(out)
    else:
        weight, bias = (conv.weight, conv.bias) if bn is None else _folded(conv, bn)
        padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        kernel = _onednn_kernel(x, weight, residual)
        if kernel is not None and (residual is None or residual.shape == _output_shape(conv, x)):
            xk, wk, bk, rk = x, weight, bias, residual
            if kernel == "bf16":  # bf16 operands, float32 accumulation
                wk, bk = _bf16_weights(conv, bn)
                xk = x.to(torch.bfloat16)
                if residual is not None:
                    rk = residual.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            if rk is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    xk, wk, bk, padding, stride, dilation, conv.groups,
                    "relu" if relu else "none", [], "",
                )  # fmt: skip
            return torch.ops.mkldnn._convolution_pointwise.binary(
                xk, rk, wk, bk, padding, stride, dilation, conv.groups,
                "add", None, "relu" if relu else None, [], "",
            )  # fmt: skip
        out = F.conv2d(x, weight, bias, stride, padding, dilation, conv.groups)
    if residual is not None:
        out = out + residual
    return F.relu(out, inplace=True) if relu else out


def conv_bn_sequential(seq: nn.Sequential | Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run the modules of ``seq`` in turn, every ``Conv2d, BatchNorm2d[, ReLU]`` run of them
    through :func:`conv_bn`."""
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            relu = i + 2 < len(mods) and isinstance(mods[i + 2], nn.ReLU)
            x = conv_bn(m, nxt, x, relu=relu)
            i += 3 if relu else 2
        else:
            x = m(x)
            i += 1
    return x
