"""VOSNetwork: the S3 / Cutie network as stage methods, with no per-video state.

The inference engine (``s3cli.inference``) drives these stages frame by frame and owns all
memory. Shapes vocabulary: B batch, N objects, Q queries, C channels (CK key, CV value), T memory
frames, H, W padded image size, h, w = H/16, W/16.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.aux_computer import AuxComputer
from s3cli.model.backbones.resnet import ResNetEncoder
from s3cli.model.backbones.vit_adapter import ViTAdapterConfig, ViTAdapterEncoder
from s3cli.model.config import ModelConfig
from s3cli.model.key_projection import KeyProjection
from s3cli.model.layers.aggregate import aggregate
from s3cli.model.layers.onednn_linear import use_onednn_linears
from s3cli.model.mask_decoder import MaskDecoder
from s3cli.model.mask_encoder import MaskEncoder
from s3cli.model.pixel_fuser import PixelFeatureFuser
from s3cli.model.transformer.object_summarizer import ObjectSummarizer
from s3cli.model.transformer.query_transformer import QueryTransformer

__all__ = ["VOSNetwork"]


def _build_pixel_encoder(cfg: ModelConfig) -> nn.Module:
    if cfg.pixel_encoder.type == "vit_adapter":
        return ViTAdapterEncoder(ViTAdapterConfig())
    return ResNetEncoder(cfg.pixel_encoder.type)


class VOSNetwork(nn.Module):
    """S3 (ViT-adapter encoder, discriminative query) or Cutie (ResNet encoder)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ms_dims = cfg.pixel_encoder.ms_dims
        self.key_dim = cfg.key_dim
        self.value_dim = cfg.value_dim
        self.sensory_dim = cfg.sensory_dim
        self.pixel_dim = cfg.pixel_dim
        self.embed_dim = cfg.embed_dim
        self.pad_divisor = cfg.pad_divisor
        self.single_object = cfg.single_object
        ot = cfg.object_transformer

        self.pixel_encoder = _build_pixel_encoder(cfg)
        self.pix_feat_proj = nn.Conv2d(self.ms_dims[0], cfg.pixel_dim, kernel_size=1)
        self.key_proj = KeyProjection(self.ms_dims[0], cfg.pixel_dim, cfg.key_dim)
        self.mask_encoder = MaskEncoder(
            cfg.pixel_dim,
            cfg.value_dim,
            cfg.sensory_dim,
            cfg.mask_encoder_final_dim,
            single_object=cfg.single_object,
        )
        self.mask_decoder = MaskDecoder(self.ms_dims, cfg.decoder_up_dims, cfg.sensory_dim)
        self.pixel_fuser = PixelFeatureFuser(
            cfg.pixel_dim,
            cfg.value_dim,
            cfg.sensory_dim,
            cfg.embed_dim,
            single_object=cfg.single_object,
        )
        self.object_transformer = QueryTransformer(
            embed_dim=ot.embed_dim,
            num_heads=ot.num_heads,
            num_queries=ot.num_queries,
            num_blocks=ot.num_blocks,
            ff_dim=ot.ff_dim,
            pe_scale=cfg.pixel_pe_scale,
            pe_temperature=cfg.pixel_pe_temperature,
            discriminative=ot.read_from_pixel == "discriminative",
        )
        self.object_summarizer = ObjectSummarizer(
            cfg.value_dim,
            ot.embed_dim,
            ot.num_queries,
            cfg.pixel_pe_scale,
            cfg.pixel_pe_temperature,
        )
        self.aux_computer = AuxComputer(cfg.sensory_dim, cfg.embed_dim)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), False)
        # CPU float32 inference through oneDNN's linear kernel (same parameters and
        # state_dict; plain F.linear whenever gradients, autocast or another device are involved)
        use_onednn_linears(self)
        # encode_image returns the mask decoder's projected skip features as ms_feat[1:]
        # (the S3 encoder folds the projections in; see ViTAdapterEncoder._projected_skips),
        # and segment takes them as such. False: the encoders' own f8, f4 (the official stages).
        self.project_skips_early = True

    @property
    def num_queries(self) -> int:
        return self.cfg.object_transformer.num_queries

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.pixel_mean) / self.pixel_std

    def _others(self, masks: torch.Tensor) -> torch.Tensor | None:
        """For each object, the union of all other objects' masks. (B, N, H, W)."""
        if self.single_object:
            return None
        return (masks.sum(dim=1, keepdim=True) - masks).clamp(0, 1)

    def encode_image(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Shapes: image (B, 3, H, W) in [0, 1], padded -> ([f16, f8, f4], pix_feat
        (B, Cp, h, w)).

        With ``project_skips_early`` f8 and f4 come back through the mask decoder's 1x1
        projections (``(B, up_dims[0], H/8, W/8)``, ``(B, up_dims[1], H/4, W/4)``): once per
        image whatever the number of objects, and folded into the S3 encoder's last steps.
        """
        image = self.normalize(image)
        if not self.project_skips_early:
            ms_feat = self.pixel_encoder(image)
        elif isinstance(self.pixel_encoder, ViTAdapterEncoder):
            proj = self.mask_decoder.decoder_feat_proc.transforms
            ms_feat = self.pixel_encoder(image, skip_proj=(proj[0], proj[1]))
        else:
            f16, f8, f4 = self.pixel_encoder(image)
            ms_feat = [f16, *self.mask_decoder.decoder_feat_proc([f8, f4])]
        return ms_feat, self.pix_feat_proj(ms_feat[0])

    def transform_key(
        self, f16: torch.Tensor, *, need_sk: bool = True, need_ek: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Shapes: f16 (B, C16, h, w) -> key (B, CK, h, w), shrinkage (B, 1, h, w), selection
        (B, CK, h, w)."""
        return self.key_proj(f16, need_s=need_sk, need_e=need_ek)

    def encode_mask(
        self,
        image: torch.Tensor,
        pix_feat: torch.Tensor,
        sensory: torch.Tensor,
        masks: torch.Tensor,
        *,
        deep_update: bool = True,
        chunk_size: int = -1,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Shapes: image (B, 3, H, W) in [0, 1]; pix_feat (B, Cp, h, w); sensory
        (B, N, Cs, h, w); masks (B, N, H, W) -> value (B, N, CV, h, w), new sensory,
        object summaries (B, N, Q, C + 1), summarizer logits (B, N, h, w, Q) or None."""
        value, new_sensory = self.mask_encoder(
            self.normalize(image),
            pix_feat,
            sensory,
            masks,
            self._others(masks),
            deep_update=deep_update,
            chunk_size=chunk_size,
        )
        summaries, logits = self.object_summarizer(masks, value, need_weights)
        return value, new_sensory, summaries, logits

    def pixel_fusion(
        self,
        pix_feat: torch.Tensor,
        pixel: torch.Tensor,
        sensory: torch.Tensor,
        last_mask: torch.Tensor,
        *,
        chunk_size: int = -1,
    ) -> torch.Tensor:
        """Shapes: pix_feat (B, Cp, h, w); pixel (B, N, CV, h, w) memory readout; sensory
        (B, N, Cs, h, w); last_mask (B, N, H, W) -> (B, N, C, h, w)."""
        last_mask = F.interpolate(last_mask, size=sensory.shape[-2:], mode="area")
        return self.pixel_fuser(
            pix_feat, pixel, sensory, last_mask, self._others(last_mask), chunk_size=chunk_size
        )

    def readout_query(
        self,
        pixel_readout: torch.Tensor,
        obj_memory: torch.Tensor,
        *,
        selector: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Shapes: pixel_readout (B, N, C, h, w); obj_memory (B, N, T, Q, C + 1) ->
        (readout (B, N, C, h, w), {"logits": aux logits})."""
        return self.object_transformer(pixel_readout, obj_memory, selector, need_weights)

    def segment(
        self,
        ms_feat: list[torch.Tensor],
        readout: torch.Tensor,
        sensory: torch.Tensor,
        *,
        selector: torch.Tensor | None = None,
        chunk_size: int = -1,
        update_sensory: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shapes: ms_feat as :meth:`encode_image` returns it; readout (B, N, C, h, w);
        sensory (B, N, Cs, h, w) -> new sensory, logits (B, N + 1, H, W) and probabilities
        (B, N + 1, H, W), channel 0 = background."""
        sensory, logits = self.mask_decoder(
            ms_feat,
            readout,
            sensory,
            chunk_size=chunk_size,
            update_sensory=update_sensory,
            skips_projected=self.project_skips_early,
        )
        prob = torch.sigmoid(logits)
        if selector is not None:
            prob = prob * selector
        logits = aggregate(prob, dim=1)
        logits = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        return sensory, logits, F.softmax(logits, dim=1)

    STAGES = (
        "encode_image",
        "transform_key",
        "encode_mask",
        "pixel_fusion",
        "readout_query",
        "segment",
    )
    """The stage functions the inference engine calls (what :meth:`compile_stages` compiles)."""

    def compile_stages(self, **options: Any) -> None:
        """Replace each stage function of this network object by its ``torch.compile``d
        version (``options`` go to ``torch.compile``). Compilation happens on each stage's
        first calls, so the first frames are slow (warm-up); idempotent."""
        if getattr(self, "_compiled_stages", False):
            return
        for name in self.STAGES:
            setattr(self, name, torch.compile(getattr(self, name), **options))
        self._compiled_stages = True

    def train(self, mode: bool = True) -> VOSNetwork:
        super().train(mode)
        # The image backbone is frozen: its batch norms always use running statistics.
        self.pixel_encoder.train(False)
        return self
