"""Model presets: ``s3-base``, ``cutie-base``, ``cutie-small`` -> ModelConfig -> network."""

from __future__ import annotations

import torch

from s3cli.model.config import ModelConfig, ObjectTransformerConfig, PixelEncoderConfig
from s3cli.model.network import VOSNetwork
from s3cli.model.synthetic import fill_synthetic_

__all__ = ["PRESETS", "model_config", "build_network", "build_network_from_state_dict"]

PRESETS: dict[str, ModelConfig] = {
    "cutie-base": ModelConfig(
        name="cutie-base",
        pixel_encoder=PixelEncoderConfig("resnet50", (1024, 512, 256)),
    ),
    "cutie-small": ModelConfig(
        name="cutie-small",
        pixel_encoder=PixelEncoderConfig("resnet18", (256, 128, 64)),
    ),
    "s3-base": ModelConfig(
        name="s3-base",
        pixel_encoder=PixelEncoderConfig("vit_adapter", (768, 768, 768)),
        object_transformer=ObjectTransformerConfig(
            num_blocks=5, num_queries=8, read_from_pixel="discriminative"
        ),
        pad_divisor=32,
    ),
}


def model_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}") from None


def build_network(name: str, *, synthetic: bool = False) -> VOSNetwork:
    """A network of preset ``name`` in eval mode; with ``synthetic`` its weights follow the
    fixtures' deterministic rule (for tests and benchmarks), otherwise they are uninitialised
    defaults to be overwritten by a checkpoint."""
    net = VOSNetwork(model_config(name))
    if synthetic:
        fill_synthetic_(net)
    return net.eval()


def build_network_from_state_dict(name: str, sd: dict[str, torch.Tensor]) -> VOSNetwork:
    """A network of preset ``name`` holding ``sd`` (keys already checked), built without
    spending time on random initialisation: modules are created on the meta device and the
    checkpoint's tensors are assigned to them."""
    cfg = model_config(name)
    with torch.device("meta"):
        net = VOSNetwork(cfg)
    net.load_state_dict(sd, strict=True, assign=True)
    # Non-persistent buffers are not in a checkpoint: make them for real.
    net.pixel_mean = torch.tensor(cfg.pixel_mean).view(-1, 1, 1)
    net.pixel_std = torch.tensor(cfg.pixel_std).view(-1, 1, 1)
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):
        net = VOSNetwork(cfg)  # an unknown non-persistent buffer: take the slow, safe path
        net.load_state_dict(sd, strict=True)
    return net.eval()
