"""S3's image encoder: a frozen ViT-B with the spatial-semantic adapter.

The paper's encoder keeps a pretrained plain ViT frozen and builds a multi-scale feature pyramid
beside it:

- a **spatial prior module** (a small conv stem) gives stride-4/8/16 maps; the stride-8 and
  stride-16 maps, lifted to the ViT width, become the adapter's spatial tokens ``c``;
- four **interaction blocks**, each owning a quarter of the ViT layers. The ViT runs unchanged
  (it never receives adapter features); after its layers the spatial tokens take
  1. **semantic embedding**: cross-attention from the spatial tokens to the CLS token and the
     mean patch token,
  2. **spatial dependency modelling**: deformable attention from the spatial tokens to the ViT's
     stride-16 patch tokens, followed by a **ConvFFN** (linear, depth-wise 3x3 conv on each token
     scale, GELU, linear);
- the spatial tokens are reshaped into stride-8/16 maps, a transposed conv brings the stride-8 map
  to stride 4 (plus the stem's stride-4 map), the ViT outputs of the first three blocks are added
  at strides 4/8/16, and each scale is batch-normalised.

Attribute names follow the official code (``D2VitAdapterDinoV2`` / ``DinoV2ViTAdapter`` with
``InteractionBlockWithCls_Efficient``), so the official ``pixel_encoder.*`` state_dict loads as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from s3cli.model.backbones.vit import VisionTransformer
from s3cli.model.layers.conv_bn import bn_scale, conv_bn_sequential
from s3cli.model.layers.deformable_attention import MSDeformAttn, Sampler, reference_points_for
from s3cli.model.layers.derived import cached_derived

__all__ = [
    "ConvFFN",
    "Extractor",
    "InteractionBlock",
    "SemanticCrossAttention",
    "SpatialPriorModule",
    "ViTAdapterConfig",
    "ViTAdapterEncoder",
]

Capture = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ViTAdapterConfig:
    """Sizes of the encoder; the defaults are the official ``adapter_depthanybase`` preset."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    patch_size: int = 16
    pos_grid: int = 37
    interaction_indexes: tuple[tuple[int, int], ...] = ((0, 2), (3, 5), (6, 8), (9, 11))
    deform_num_heads: int = 12
    n_points: int = 4
    cffn_ratio: float = 0.25
    conv_inplane: int = 64
    num_extra_extractors: int = 2
    vit_eps: float = 1e-6
    adapter_eps: float = 1e-6
    semantic_eps: float = 1e-5
    freeze_vit: bool = True
    # ViT attention through scaled_dot_product_attention (False: the official explicit softmax)
    fused_attention: bool = True
    # deformable-attention sampling: one weighted row gather, or the official grid_sample path
    deform_sampler: Sampler = "gather"
    # semantic cross-attention computed through its two keys (False: nn.MultiheadAttention)
    fold_semantic: bool = True
    # stride-8 -> stride-4 upsampling (a 2x2 stride-2 transposed conv) as one matrix product on
    # the stride-8 tokens (False: the official nn.ConvTranspose2d on the map)
    upsample_as_matmul: bool = True


class SpatialPriorModule(nn.Module):
    """Spatial prior module: a conv stem giving stride-4/8/16 features at the ViT width.

    Returns c1 as a map ``(B, C, H/4, W/4)`` and c2, c3 as tokens ``(B, H/8*W/8, C)``,
    ``(B, H/16*W/16, C)``.
    """

    def __init__(self, inplanes: int = 64, embed_dim: int = 768) -> None:
        super().__init__()

        def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.stem = nn.Sequential(
            *conv_bn_relu(3, inplanes, 2),
            *conv_bn_relu(inplanes, inplanes, 1),
            *conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, kernel_size=1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, kernel_size=1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1)

    def forward(
        self, x: torch.Tensor, lift_c1: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``lift_c1=False`` returns c1 as the stem made it, ``(B, inplanes, H/4, W/4)``, for a
        caller that folds ``fc1`` into what it does with c1 next."""
        # Channels-last throughout (no layout reorders in oneDNN's convolutions), so the
        # token lists come out of the 1x1 lifts contiguous, without a transposing copy.
        c1 = conv_bn_sequential(self.stem, x.contiguous(memory_format=torch.channels_last))
        c2 = conv_bn_sequential(self.conv2, c1)  # (B, 128, H/8, W/8)
        c3 = conv_bn_sequential(self.conv3, c2)  # (B, 256, H/16, W/16)
        if lift_c1:
            c1 = self.fc1(c1).contiguous()  # (B, C, H/4, W/4)
        c2 = self.fc2(c2).flatten(2).transpose(1, 2)  # (B, H/8*W/8, C)
        c3 = self.fc3(c3).flatten(2).transpose(1, 2)  # (B, H/16*W/16, C)
        return c1, c2, c3  # c1 (B, 64, H/4, W/4) channels-last when not lifted


class SemanticCrossAttention(nn.Module):
    """Semantic embedding: the spatial tokens read the ViT's CLS and mean patch token.

    ``c = LN(c) + MHA(query=LN(c), key=value=[cls, mean patch])``. As in the official
    ``CrossAttention`` the residual is the *normalised* input and the LayerNorm has PyTorch's
    default eps (1e-5).

    With ``folded`` (the default) the attention is computed through its two keys instead of
    through ``nn.MultiheadAttention``: the query projection is folded into the keys and the
    output projection into the values, which is exact algebra because there are only two keys.
    Per head h, with ``W_q``, ``W_o`` the head's slices of the projections:

    - ``logits[n, h, j] = (c_n W_q^T + b_q) . k_j * s = c_n . (W_q^T k_j) s + (b_q . k_j) s``,
      one ``(N, C) x (C, 2 heads)`` product instead of projecting all N queries ``(C x C)``;
    - ``out_n = W_o [sum_j p[n, h, j] v_j]_h + b_o = sum_(h, j) p[n, h, j] (W_o,h v_j) + b_o``,
      one ``(N, 2 heads) x (2 heads, C)`` product instead of the ``(C x C)`` output projection.

    At 480p this is 2 x 0.3 instead of 2 x 9.6 GFLOP per block; the result equals the module's
    to float32 rounding (the fixtures' parity tests run on it). ``folded=False`` runs the module.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5, folded: bool = True) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.folded = folded

    def forward(self, c: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """``c``: ``(B, N, C)`` spatial tokens; ``mem``: ``(B, 2, C)``. Returns ``(B, N, C)``."""
        c = self.norm(c)
        if self.folded:
            return c + self._folded_attention(c, mem)
        out, _ = self.cross_attn(c, mem, mem, need_weights=False)
        return c + out

    def _folded_attention(self, c: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        mha = self.cross_attn
        b, n, dim = c.shape
        heads, n_keys = mha.num_heads, mem.shape[1]
        head_dim = dim // heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)  # (C, C) each
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        k = F.linear(mem, w_k, b_k).view(b, n_keys, heads, head_dim) * head_dim**-0.5
        v = F.linear(mem, w_v, b_v).view(b, n_keys, heads, head_dim)
        # Query projection folded into the keys: (B, C, heads * keys) and (B, 1, heads * keys).
        w_qh = w_q.view(heads, head_dim, dim)
        fold_q = torch.einsum("hdc,bjhd->bchj", w_qh, k).reshape(b, dim, heads * n_keys)
        bias_q = torch.einsum("hd,bjhd->bhj", b_q.view(heads, head_dim), k).reshape(b, 1, -1)
        logits = torch.baddbmm(bias_q, c, fold_q)  # (B, N, heads * keys)
        probs = logits.view(b, n, heads, n_keys).softmax(dim=-1).view(b, n, heads * n_keys)
        # Output projection folded into the values: (B, heads * keys, C).
        w_oh = mha.out_proj.weight.view(dim, heads, head_dim)
        fold_o = torch.einsum("chd,bjhd->bhjc", w_oh, v).reshape(b, heads * n_keys, dim)
        return torch.baddbmm(mha.out_proj.bias.expand(b, 1, dim), probs, fold_o)  # (B, N, C)


def _token_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``(B, h*w, C)`` as a contiguous map ``(B, C, h, w)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w).contiguous()


class DWConv(nn.Module):
    """Depth-wise 3x3 conv on the token list ``[stride-8 tokens, stride-16 tokens]``.

    The list is split back into its two maps and the same conv runs on each separately.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``x``: ``(B, 4hw + hw, C)`` with (h, w) the stride-16 grid. Returns the same shape."""
        # The official code splits at 16 * (N // 20), which is 4hw whenever it runs at all.
        n8 = 4 * h * w
        x8 = _token_map(x[:, :n8], 2 * h, 2 * w)  # (B, C, 2h, 2w)
        x16 = _token_map(x[:, n8:], h, w)  # (B, C, h, w)
        x8 = self.dwconv(x8).flatten(2).transpose(1, 2)  # (B, 4hw, C)
        x16 = self.dwconv(x16).flatten(2).transpose(1, 2)  # (B, hw, C)
        return torch.cat([x8, x16], dim=1)


class ConvFFN(nn.Module):
    """ConvFFN: ``fc2(GELU(dwconv(fc1(x))))``, the depth-wise conv adding local context."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)  # (B, N, hidden)
        x = self.act(self.dwconv(x, h, w))
        return self.fc2(x)  # (B, N, C)


class Extractor(nn.Module):
    """Spatial dependency modelling: deformable attention to the ViT tokens, then ConvFFN.

    ``c = c + MSDeformAttn(LN(c), LN(vit tokens))``; ``c = c + ConvFFN(LN(c))``. One level (the
    stride-16 ViT tokens); each spatial token's reference point is its own cell centre.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        cffn_ratio: float,
        eps: float = 1e-6,
        sampler: Sampler = "gather",
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=eps)
        self.feat_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = MSDeformAttn(
            d_model=dim, n_levels=1, n_heads=num_heads, n_points=n_points, sampler=sampler
        )
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(
        self, c: torch.Tensor, reference_points: torch.Tensor, feat: torch.Tensor, h: int, w: int
    ) -> torch.Tensor:
        """Update spatial tokens ``c`` ``(B, 5hw, C)`` from ViT tokens ``feat`` ``(B, hw, C)``.

        ``reference_points``: ``(1, 5hw, 1, 2)``; (h, w) is the stride-16 grid.
        """
        attn = self.attn(self.query_norm(c), reference_points, self.feat_norm(feat), [(h, w)])
        c = c + attn
        return c + self.ffn(self.ffn_norm(c), h, w)


class InteractionBlock(nn.Module):
    """One interaction block (official ``InteractionBlockWithCls_Efficient``), minus the ViT layers.

    The ViT layers it owns live in the shared ``vit_module`` and are run by the encoder; this
    module updates the spatial tokens from their output: semantic cross-attention, the extractor,
    and (last block only) extra extractors.
    """

    def __init__(self, cfg: ViTAdapterConfig, num_extra_extractors: int = 0) -> None:
        super().__init__()

        def extractor() -> Extractor:
            return Extractor(
                cfg.embed_dim,
                cfg.deform_num_heads,
                cfg.n_points,
                cfg.cffn_ratio,
                cfg.adapter_eps,
                sampler=cfg.deform_sampler,
            )

        self.extractor = extractor()
        self.extra_extractors = (
            nn.Sequential(*[extractor() for _ in range(num_extra_extractors)])
            if num_extra_extractors
            else None
        )
        self.read_from_cls = SemanticCrossAttention(
            cfg.embed_dim, cfg.deform_num_heads, eps=cfg.semantic_eps, folded=cfg.fold_semantic
        )

    def forward(
        self,
        c: torch.Tensor,
        x: torch.Tensor,
        cls: torch.Tensor,
        reference_points: torch.Tensor,
        h: int,
        w: int,
        capture: Capture | None = None,
        prefix: str = "",
    ) -> torch.Tensor:
        """``c``: ``(B, 5hw, C)`` spatial tokens; ``x``: ``(B, hw, C)``; ``cls``: ``(B, 1, C)``."""
        mem = torch.cat([cls, x.mean(dim=1, keepdim=True)], dim=1)  # (B, 2, C)
        c = self.read_from_cls(c, mem)
        if capture is not None:
            capture[f"{prefix}c_after_cls"] = c
        c = self.extractor(c, reference_points, x, h, w)
        if capture is not None:
            capture[f"{prefix}c_after_extractor"] = c
        if self.extra_extractors is not None:
            for extra in self.extra_extractors:
                c = extra(c, reference_points, x, h, w)
        return c


def _resize(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear resizing by ``factor`` (``align_corners=False``, as the official code)."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def _bn_tensors(bn: nn.BatchNorm2d) -> list[torch.Tensor | None]:
    return [bn.weight, bn.bias, bn.running_mean, bn.running_var]


def _affine_after_bn(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, k)`` with ``conv(bn(x)) = A x + k`` per pixel, for a 1x1 ``conv`` and ``bn`` in
    eval mode: ``A`` ``(O, C)``, ``k`` ``(O,)``, float32."""
    scale = bn_scale(bn)
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    weight = conv.weight.float().flatten(1)  # (O, C)
    const = weight @ shift
    if conv.bias is not None:
        const = const + conv.bias.float()
    return weight * scale, const


class ViTAdapterEncoder(nn.Module):
    """Frozen ViT-B + spatial-semantic adapter; returns ``[f16, f8, f4]`` (all ``embed_dim`` ch).

    The input is a mean/std-normalised image ``(B, 3, H, W)`` with H and W multiples of 32 (the
    padding S3 uses; multiples of 16 would do for this implementation).
    """

    def __init__(self, cfg: ViTAdapterConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ViTAdapterConfig()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.ms_dims: tuple[int, int, int] = (dim, dim, dim)
        n_blocks = len(cfg.interaction_indexes)
        if n_blocks < 3:
            raise ValueError("the adapter needs at least 3 interaction blocks (strides 4, 8, 16)")
        # Registration order matches the official module, so state_dict keys come out in order.
        self.level_embed = nn.Parameter(torch.zeros(2, dim))
        self.spm = SpatialPriorModule(cfg.conv_inplane, dim)
        self.interactions = nn.Sequential(
            *[
                InteractionBlock(cfg, cfg.num_extra_extractors if i == n_blocks - 1 else 0)
                for i in range(n_blocks)
            ]
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1 = nn.BatchNorm2d(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.norm3 = nn.BatchNorm2d(dim)
        self.vit_module = VisionTransformer(
            embed_dim=dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_hidden=cfg.mlp_hidden,
            patch_size=cfg.patch_size,
            pos_grid=cfg.pos_grid,
            eps=cfg.vit_eps,
            fused_attention=cfg.fused_attention,
        )
        nn.init.normal_(self.level_embed)
        if cfg.freeze_vit:
            self.vit_module.requires_grad_(False)

    def _run_vit(self, tokens: torch.Tensor, first: int, last: int) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_vit):
            for blk in self.vit_module.blocks[first : last + 1]:
                tokens = blk(tokens)
        return tokens

    def forward(
        self,
        x: torch.Tensor,
        capture: Capture | None = None,
        skip_proj: tuple[nn.Conv2d, nn.Conv2d] | None = None,
    ) -> list[torch.Tensor]:
        """Encode a normalised image ``(B, 3, H, W)``.

        Returns ``[f16, f8, f4]``: ``(B, C, H/16, W/16)``, ``(B, C, H/8, W/8)``,
        ``(B, C, H/4, W/4)``.

        ``skip_proj``, when given, is a pair of 1x1 convolutions (the mask decoder's projections
        of its stride-8 and stride-4 skip features); the stride-8 and stride-4 outputs are then
        ``skip_proj[0](f8)`` and ``skip_proj[1](f4)``, computed at inference without forming the
        ``C``-channel maps (see :meth:`_projected_skips`).

        ``capture``, when given, is filled with adapter internals (for tests): ``vit_tokens_in``,
        ``spm_c2``, ``spm_c3`` (before the level embedding), and per block i ``int{i}_x``,
        ``int{i}_cls``, ``int{i}_c_after_cls``, ``int{i}_c16_after_cls``,
        ``int{i}_c_after_extractor``, ``int{i}_c16_out``, plus
        ``int0_c8_after_extractor_first64``. Tensors are stored, not copied.
        """
        height, width = x.shape[-2:]
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} must be a multiple of {p} (S3 pads to 32)")
        h, w = height // p, width // p
        n8 = 4 * h * w
        fold = skip_proj is not None and capture is None and self._can_fold(x, skip_proj)

        # Spatial prior: stride-8 then stride-16 tokens, each with its level embedding.
        c1, c2, c3 = self.spm(x, lift_c1=not fold)
        if capture is not None:
            capture["spm_c2"], capture["spm_c3"] = c2, c3
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1]], dim=1)  # (B, 5hw, C)
        # Each spatial token's reference point is its own cell centre on its own grid.
        ref = reference_points_for([(2 * h, 2 * w), (h, w)], x.device, c.dtype)[:, :, None]

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_vit):
            tokens, _, _ = self.vit_module.prepare_tokens(x)  # (B, 1 + hw, C)
        if capture is not None:
            capture["vit_tokens_in"] = tokens

        vit_tokens: list[torch.Tensor] = []  # (B, hw, C) after blocks 0, 1, 2
        for i, (layer, (first, last)) in enumerate(
            zip(self.interactions, self.cfg.interaction_indexes, strict=True)
        ):
            tokens = self._run_vit(tokens, first, last)
            cls, xs = tokens[:, :1], tokens[:, 1:]  # (B, 1, C), (B, hw, C)
            c = layer(c, xs, cls, ref, h, w, capture=capture, prefix=f"int{i}_")
            if capture is not None:
                capture[f"int{i}_x"], capture[f"int{i}_cls"] = xs, cls
                capture[f"int{i}_c16_after_cls"] = capture[f"int{i}_c_after_cls"][:, n8:]
                capture[f"int{i}_c16_out"] = c[:, n8:]
            if i < 3:  # blocks 0-2 feed strides 4/8/16; later blocks' ViT maps are unused
                vit_tokens.append(xs)
        if capture is not None:
            capture["int0_c8_after_extractor_first64"] = capture["int0_c_after_extractor"][:, :64]

        # Back to maps; stride 4 = upsampled stride-8 map + the stem's stride-4 map, and the ViT
        # features of blocks 0, 1, 2 at strides 4, 8, 16. Under autocast the ViT maps join in the
        # dtype of the maps they are added to (a float32 one would promote the whole sum).
        # Maps are contiguous (NCHW) like the official code's: the resize kernel depends on layout.
        f16 = _token_map(c[:, n8:], h, w)
        f16 = self.norm3(f16 + _token_map(vit_tokens[2], h, w).to(f16.dtype))
        if fold:
            assert skip_proj is not None
            return [f16, *self._projected_skips(c[:, :n8], c1, vit_tokens, skip_proj, h, w)]
        f8 = _token_map(c[:, :n8], 2 * h, 2 * w)
        if self.cfg.upsample_as_matmul:
            f4 = self._upsample_tokens(c[:, :n8], c1, 2 * h, 2 * w)
        else:
            f4 = self.up(f8) + c1
        vit4 = _resize(_token_map(vit_tokens[0], h, w), 4)
        vit8 = _resize(_token_map(vit_tokens[1], h, w), 2)
        f4 = self.norm1(f4 + vit4.to(f4.dtype))
        f8 = self.norm2(f8 + vit8.to(f8.dtype))
        if skip_proj is not None:
            return [f16, skip_proj[0](f8), skip_proj[1](f4)]
        return [f16, f8, f4]

    def _can_fold(self, x: torch.Tensor, skip_proj: tuple[nn.Conv2d, nn.Conv2d]) -> bool:
        """Whether :meth:`_projected_skips` applies: inference with running statistics, and
        plain 1x1 projections."""
        if self.training or any(bn.training for bn in (self.norm1, self.norm2)):
            return False
        for conv in skip_proj:
            if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
                return False
            if conv.padding not in ((0, 0), "valid"):
                return False
        params = [*self.parameters(), *(p for conv in skip_proj for p in conv.parameters())]
        wants_grad = x.requires_grad or any(p.requires_grad for p in params)
        return not (torch.is_grad_enabled() and wants_grad)

    def _skip_folds(self, skip_proj: tuple[nn.Conv2d, nn.Conv2d]) -> dict[str, torch.Tensor]:
        """The folded weights of :meth:`_projected_skips`, cached until a source changes."""
        sources = [
            *(t for conv in (*skip_proj, self.up, self.spm.fc1) for t in (conv.weight, conv.bias)),
            *(t for bn in (self.norm1, self.norm2) for t in _bn_tensors(bn)),
        ]
        if torch.compiler.is_compiling():  # traced: no cache on the module
            return self._fold_skips(skip_proj)
        make = lambda: self._fold_skips(skip_proj)  # noqa: E731
        return cached_derived(self, "_cached_skip_folds", sources, make)

    @torch.no_grad()
    def _fold_skips(self, skip_proj: tuple[nn.Conv2d, nn.Conv2d]) -> dict[str, torch.Tensor]:
        """In eval mode ``P(BN(x)) = A x + k`` per pixel with ``A = W diag(s)`` and
        ``k = W t + b`` (``P``'s weight and bias ``W``, ``b``; the batch norm's scale and shift
        ``s``, ``t``). Returns, in the parameters' dtype:

        - ``a8``, ``k8``: ``(O8, C)``, ``(O8,)`` for the stride-8 output;
        - ``a4``: ``(O4, C)``; ``up``: ``(C, O4 * 4)``, the transposed convolution's weight
          ``(C, C, 2, 2)`` followed by ``A4`` (columns ordered (O4, 2, 2)); ``fc1``:
          ``(O4, inplanes, 1, 1)``, the stem's lift followed by ``A4``; ``k4``: ``(O4,)``, every
          constant of the stride-4 sum (both biases through ``A4``, plus ``W4 t4 + b4``).
        """
        a8, k8 = _affine_after_bn(self.norm2, skip_proj[0])
        a4, k4 = _affine_after_bn(self.norm1, skip_proj[1])
        up = torch.einsum("icab,oc->ioab", self.up.weight.float(), a4).flatten(1)
        fc1 = self.spm.fc1
        lift = (a4 @ fc1.weight.float().flatten(1))[..., None, None]
        k4 = k4 + a4 @ (self.up.bias.float() + fc1.bias.float())
        dtype = self.up.weight.dtype
        folds = {"a8": a8, "k8": k8, "a4": a4, "up": up, "fc1": lift, "k4": k4}
        return {k: v.to(dtype).contiguous() for k, v in folds.items()}

    def _projected_skips(
        self,
        c8: torch.Tensor,
        c1: torch.Tensor,
        vit_tokens: list[torch.Tensor],
        skip_proj: tuple[nn.Conv2d, nn.Conv2d],
        h: int,
        w: int,
    ) -> list[torch.Tensor]:
        """``[P8(norm2(f8)), P4(norm1(f4))]`` with the projections folded in first.

        Every step from the tokens to the projected skip features is linear and acts per pixel
        on the channels (the batch norms at inference, the 1x1 projections, the stem's lift
        ``fc1``, the 2x2 transposed convolution on each cell) or per channel on the positions
        (bilinear resizing), so the projection moves before the resizing and the upsampling:
        the ``C``-channel stride-4 map (768 x 120 x 216 at 480p, a dozen passes over it and
        the 31 GFLOP transposed convolution in the plain order) is never formed; everything
        runs at the projections' widths. Equal to the plain order to float rounding.

        Shapes: c8 (B, 4hw, C) stride-8 tokens; c1 (B, inplanes, 4h, 4w) the stem's map (not
        lifted); vit_tokens [(B, hw, C)] of ViT blocks 0 and 1 -> [(B, O8, 2h, 2w),
        (B, O4, 4h, 4w)].
        """
        folds = self._skip_folds(skip_proj)
        b = c8.shape[0]
        # stride 8: the tokens and the ViT map projected, then the ViT map resized
        s8 = F.linear(c8, folds["a8"], folds["k8"]).transpose(1, 2)  # (B, O8, 4hw)
        s8 = s8.reshape(b, -1, 2 * h, 2 * w)  # a new contiguous map
        v8 = _token_map(F.linear(vit_tokens[1], folds["a8"]), h, w)  # (B, O8, h, w)
        s8.add_(_resize(v8, 2).to(s8.dtype))
        # stride 4: lifted stem map with all constants, the transposed convolution's 2x2 blocks
        # scattered onto it, the ViT map resized
        s4 = F.conv2d(c1, folds["fc1"], folds["k4"]).contiguous()  # (B, O4, 4h, 4w)
        o4 = s4.shape[1]
        blocks = torch.matmul(c8, folds["up"])  # (B, 4hw, O4 * 2 * 2)
        blocks = blocks.view(b, 2 * h, 2 * w, o4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        s4.view(b, o4, 2 * h, 2, 2 * w, 2).add_(blocks.to(s4.dtype))
        v4 = _token_map(F.linear(vit_tokens[0], folds["a4"]), h, w)  # (B, O4, h, w)
        s4.add_(_resize(v4, 4).to(s4.dtype))
        return [s8, s4]

    def _upsample_tokens(
        self, tokens: torch.Tensor, c1: torch.Tensor, h8: int, w8: int
    ) -> torch.Tensor:
        """``self.up(map of tokens) + c1`` computed on the tokens.

        A 2x2 transposed convolution of stride 2 maps each input cell to its own 2x2 output
        block: ``out[o, 2i + di, 2j + dj] = sum_c x[c, i, j] W[c, o, di, dj] + bias[o]``. So it
        is one ``(B, h8*w8, C) x (C, C*4)`` product on the tokens; the product's rows are then
        scattered to the map while being added to ``c1`` (no separate reordering pass).

        Shapes: tokens (B, h8*w8, C); c1 (B, C, 2*h8, 2*w8) -> (B, C, 2*h8, 2*w8).
        """
        b, _, dim = tokens.shape
        weight = self.up.weight  # (C_in, C_out, 2, 2)
        blocks = torch.matmul(tokens, weight.flatten(1))  # (B, h8*w8, C_out*2*2)
        # (B, h8, w8, C, 2, 2) -> (B, C, h8, 2, w8, 2): the map's layout, as a view
        blocks = blocks.view(b, h8, w8, dim, 2, 2).permute(0, 3, 1, 4, 2, 5)
        out = c1 + self.up.bias.to(c1.dtype).view(1, dim, 1, 1)  # a new tensor: add in place
        out.view(b, dim, h8, 2, w8, 2).add_(blocks.to(out.dtype))
        return out
