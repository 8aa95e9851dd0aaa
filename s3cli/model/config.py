"""Typed configuration of the VOS networks: one frozen dataclass per block.

Defaults equal the official presets (Cutie ``base.yaml``, S3 ``adapter_depthanybase.yaml``).
Blocks take plain typed arguments; only the registry and the network read ``ModelConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "PixelEncoderConfig",
    "ObjectTransformerConfig",
    "ModelConfig",
]


@dataclass(frozen=True)
class PixelEncoderConfig:
    """Image backbone: ``resnet50``/``resnet18`` (Cutie) or ``vit_adapter`` (S3).

    ``ms_dims`` are the channels of the stride-16, 8 and 4 features it returns.
    """

    type: Literal["resnet50", "resnet18", "vit_adapter"] = "resnet50"
    ms_dims: tuple[int, int, int] = (1024, 512, 256)


@dataclass(frozen=True)
class ObjectTransformerConfig:
    """The object (query) transformer. ``read_from_pixel`` picks Cutie's masked cross-attention
    (``cross_attention``) or S3's discriminative query (``discriminative``)."""

    embed_dim: int = 256
    ff_dim: int = 2048
    num_heads: int = 8
    num_blocks: int = 3
    num_queries: int = 16
    read_from_pixel: Literal["cross_attention", "discriminative"] = "cross_attention"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a :class:`~s3cli.model.network.VOSNetwork`."""

    name: str = "cutie-base"
    pixel_encoder: PixelEncoderConfig = field(default_factory=PixelEncoderConfig)
    object_transformer: ObjectTransformerConfig = field(default_factory=ObjectTransformerConfig)
    pixel_dim: int = 256
    key_dim: int = 64
    value_dim: int = 256
    sensory_dim: int = 256
    embed_dim: int = 256
    mask_encoder_final_dim: int = 256
    decoder_up_dims: tuple[int, int, int] = (256, 128, 128)
    pixel_pe_scale: float = 32.0
    pixel_pe_temperature: float = 128.0
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Inputs are zero-padded to a multiple of this (S3's adapter needs 32, Cutie 16).
    pad_divisor: int = 16
    single_object: bool = False
