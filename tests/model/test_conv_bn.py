"""Folded / fused convolution + batch norm (s3cli.model.layers.conv_bn) against the modules run
one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.backbones.resnet import ResNetEncoder
from s3cli.model.layers.conv_bn import (
    conv_bn,
    conv_bn_sequential,
    fold_conv_bn,
)


def _pair(
    cin: int, cout: int, k: int, stride: int, bias: bool, seed: int
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (cin * k * k) ** 0.5)
        if bias:
            conv.bias.copy_(0.1 * torch.randn(cout, generator=g))
        bn.weight.copy_(1 + 0.2 * torch.randn(cout, generator=g))
        bn.bias.copy_(0.2 * torch.randn(cout, generator=g))
        bn.running_mean.copy_(0.3 * torch.randn(cout, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(cout, generator=g))
    return conv.eval(), bn.eval()


def _reference(conv, bn, x, relu=False, residual=None):
    out = bn(conv(x)) if bn is not None else conv(x)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "k,stride,bias", [(3, 1, False), (3, 2, True), (1, 2, False), (7, 2, False)]
)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_equals_modules(layout, k, stride, bias, relu, with_residual) -> None:
    conv, bn = _pair(16, 24, k, stride, bias, seed=k * 10 + stride)
    x = torch.randn(2, 16, 21, 30, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = _reference(conv, bn, x, relu=False)
        residual = torch.randn(ref.shape) if with_residual else None
        if residual is not None and layout == "channels_last":
            residual = residual.contiguous(memory_format=torch.channels_last)
        ref = _reference(conv, bn, x, relu, residual)
        out = conv_bn(conv, bn, x, relu=relu, residual=residual)
        plain = conv_bn(conv, None, x, relu=relu, residual=residual)
        plain_ref = _reference(conv, None, x, relu, residual)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, plain_ref, rtol=1e-5, atol=1e-5)
    if relu:
        assert (out >= 0).all()


def test_fold_formula() -> None:
    conv, bn = _pair(8, 8, 3, 1, True, seed=3)
    w, b = fold_conv_bn(conv, bn)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_inference_runs_one_fused_operator() -> None:
    """No batch norm, add or ReLU kernel is left: each block is one oneDNN primitive."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    enc = ResNetEncoder("resnet18").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        enc(x)
        with torch.profiler.profile() as prof:
            enc(x)
    names = {e.key for e in prof.key_averages()}
    assert "mkldnn::_convolution_pointwise" in names
    assert not names & {"aten::native_batch_norm", "aten::batch_norm", "aten::relu_", "aten::add"}


def test_training_and_grad_run_the_modules() -> None:
    """With a gradient wanted (or batch norms training) the modules run as written."""
    conv, bn = _pair(4, 6, 3, 1, False, seed=5)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = conv_bn(conv, bn, x, relu=True)
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    bn.train()
    before = bn.running_mean.clone()
    with torch.no_grad():
        conv_bn(conv, bn, x)
    assert not torch.equal(bn.running_mean, before)  # batch statistics were used and tracked


def test_cached_fold_follows_new_weights() -> None:
    """Loading other weights (in place, as load_state_dict does) refolds."""
    conv, bn = _pair(4, 6, 3, 1, False, seed=6)
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        first = conv_bn(conv, bn, x)
    other_conv, other_bn = _pair(4, 6, 3, 1, False, seed=7)
    conv.load_state_dict(other_conv.state_dict())
    bn.load_state_dict(other_bn.state_dict())
    with torch.inference_mode():
        second = conv_bn(conv, bn, x)
        torch.testing.assert_close(second, bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)


def test_bf16_autocast_close_to_float32() -> None:
    conv, bn = _pair(16, 16, 3, 1, False, seed=8)
    x = torch.randn(1, 16, 12, 12)
    with torch.inference_mode():
        ref = _reference(conv, bn, x, relu=True, residual=x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv_bn(conv, bn, x, relu=True, residual=x)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_sequential_runs_conv_bn_relu_groups() -> None:
    conv1, bn1 = _pair(3, 8, 3, 2, False, seed=9)
    conv2, bn2 = _pair(8, 8, 3, 1, False, seed=10)
    seq = nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2, nn.MaxPool2d(2)).eval()
    x = torch.randn(1, 3, 20, 20)
    with torch.inference_mode():
        torch.testing.assert_close(conv_bn_sequential(seq, x), seq(x), rtol=1e-5, atol=1e-5)


def test_channels_last_input_keeps_its_layout() -> None:
    """The trunks run channels-last: a stem on a channels-last input equals the modules and
    stays channels-last, with gradients too."""
    conv, bn = _pair(3, 16, 7, 2, False, seed=11)
    stem = nn.Sequential(conv, bn, nn.ReLU(), nn.MaxPool2d(3, 2, 1)).eval()
    x = torch.randn(2, 3, 40, 56).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = conv_bn_sequential(stem, x)
        ref = stem(x.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.shape == ref.shape == (2, 16, 10, 14)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # with gradients it runs the modules as written and stays differentiable
    y = conv_bn_sequential(stem, x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_bf16_autocast_fused_equals_autocast_modules(layout, relu, with_residual) -> None:
    """Under CPU bf16 autocast the folded convolution (bf16 weights cached, add and ReLU fused
    where oneDNN can) gives autocast's own module-by-module result to bf16 rounding, and the
    float32 one to bf16 precision."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    conv, bn = _pair(32, 48, 3, 1, False, seed=11)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 32, 20, 28, generator=gen)
    residual = torch.randn(1, 48, 20, 28, generator=gen) if with_residual else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = _reference(conv, bn, x, relu, residual)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv_bn(conv, bn, x, relu=relu, residual=residual)
            plain = _reference(conv, bn, x.bfloat16(), relu, residual)  # autocast's modules
    if layout == "channels_last" or residual is None:
        assert out.dtype == torch.bfloat16  # one bf16 primitive
    # The sum is rounded to bf16 once where autocast rounds the product first.
    torch.testing.assert_close(out.float(), plain.float(), rtol=2**-7, atol=2**-5)
    torch.testing.assert_close(out.float(), ref, rtol=2**-6, atol=2**-5)


def test_bf16_autocast_runs_fused_primitives_on_cached_weights() -> None:
    """A channels-last ResNet under bf16 autocast: every block one bf16 oneDNN primitive (no
    separate add, ReLU or batch norm), and the weights cast to bf16 once, not on every call."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    enc = ResNetEncoder("resnet18").eval()
    x = torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = enc(x)
        with torch.profiler.profile() as prof:
            second = enc(x)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    counts = {e.key: e.count for e in prof.key_averages()}
    convs = sum(isinstance(m, nn.Conv2d) for m in enc.modules())
    assert counts.get("mkldnn::_convolution_pointwise", 0) == convs
    assert not set(counts) & {
        "aten::native_batch_norm", "aten::batch_norm", "aten::relu_", "aten::add",
        "aten::clamp_min_", "aten::mkldnn_convolution",
    }  # fmt: skip
    # No weight cast per call: the only copies left are the input's cast to bf16 and the three
    # outputs made contiguous.
    assert counts.get("aten::copy_", 0) <= 4
