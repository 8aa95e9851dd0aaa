"""Parity of the S3 image encoder (frozen ViT-B + spatial-semantic adapter) with the official code.

The golden arrays in ``shared/fixtures/s3`` (``adapter_f0.npz``, ``stage_f0.npz``,
``stage_f1.npz``) were made by the official implementation with the synthetic weight rule; see
that folder's README for the exact pre-processing and tolerances.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s3cli.model.backbones.vit import Attention, VisionTransformer, blocked_attention
from s3cli.model.backbones.vit_adapter import (
    SemanticCrossAttention,
    ViTAdapterConfig,
    ViTAdapterEncoder,
)
from s3cli.model.layers.deformable_attention import (
    MSDeformAttn,
    ms_deform_attn_core,
    ms_deform_attn_gather,
    reference_points_for,
)
from s3cli.model.synthetic import synthetic_state_dict
from tests.conftest import FIXTURES, assert_close_elementwise, load_npz, require_shared

S3 = FIXTURES / "s3"
PREFIX = "pixel_encoder."
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD_LRTB = (5, 6, 4, 4)  # 120x213 -> 128x224, see the fixture README
TOL_F32 = 1e-3
TOL_F16 = 2e-3


def _tol(ref: np.ndarray) -> float:
    """README tolerance: float16-stored arrays get the looser bound."""
    return TOL_F16 if ref.dtype == np.float16 else TOL_F32


def _encoder_keys() -> list[dict]:
    with open(require_shared(S3 / "keys.json")) as f:
        keys = json.load(f)["keys"]
    return [k for k in keys if k["name"].startswith(PREFIX)]


# The official code's formulation of every block that has a faster default beside it.
OFFICIAL_PATHS = ViTAdapterConfig(
    fused_attention=False,
    deform_sampler="grid_sample",
    fold_semantic=False,
    upsample_as_matmul=False,
)


def _synthetic_encoder(cfg: ViTAdapterConfig | None = None) -> ViTAdapterEncoder:
    """Encoder with the fixture weights (the rule seeds from the full ``pixel_encoder.`` key)."""
    enc = ViTAdapterEncoder(cfg).eval()
    full = synthetic_state_dict({PREFIX + k: v for k, v in enc.state_dict().items()})
    enc.load_state_dict({k[len(PREFIX) :]: v for k, v in full.items()}, strict=True)
    return enc


def _model_input(frame: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> zero-padded to 128x224 in [0, 1] -> normalised (1, 3, 128, 224)."""
    x = torch.from_numpy(frame).float().div(255).permute(2, 0, 1)  # (3, 120, 213)
    x = F.pad(x, PAD_LRTB)  # (3, 128, 224)
    mean = torch.tensor(MEAN).view(-1, 1, 1)
    std = torch.tensor(STD).view(-1, 1, 1)
    return ((x - mean) / std)[None]


@pytest.fixture(scope="module", params=["default", "official-paths"])
def encoder(request: pytest.FixtureRequest) -> ViTAdapterEncoder:
    """The default encoder (fused attention, gathered deformable sampling, folded semantic
    attention) and the one running the official formulations: both must meet the fixtures."""
    require_shared(S3)
    return _synthetic_encoder(OFFICIAL_PATHS if request.param == "official-paths" else None)


@pytest.fixture(scope="module")
def runs(encoder: ViTAdapterEncoder) -> dict[str, dict[str, torch.Tensor]]:
    """One forward per frame: frame 0 with the internals captured, frame 1 plain."""
    frames = load_npz(S3 / "inputs.npz")["frames"]
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.inference_mode():
        for t in (0, 1):
            capture: dict[str, torch.Tensor] = {}
            f16, f8, f4 = encoder(_model_input(frames[t]), capture=capture if t == 0 else None)
            out[f"f{t}"] = {"ms16": f16, "ms8": f8, "ms4": f4, **capture}
    return out


# ----------------------------------------------------------------------------- state_dict


def test_state_dict_matches_official_keys(encoder: ViTAdapterEncoder) -> None:
    ref = [(k["name"][len(PREFIX) :], tuple(k["shape"])) for k in _encoder_keys()]
    ours = [(k, tuple(v.shape)) for k, v in encoder.state_dict().items()]
    assert len(ref) == 373
    assert set(ours) == set(ref)
    assert ours == ref  # same order as well
    assert encoder.ms_dims == (768, 768, 768)


def test_synthetic_weights_match_fingerprints(encoder: ViTAdapterEncoder) -> None:
    sd = encoder.state_dict()
    for entry in _encoder_keys():
        t = sd[entry["name"][len(PREFIX) :]].double()
        name = entry["name"]
        assert t.sum().item() == pytest.approx(entry["sum"], rel=1e-9, abs=1e-9), name
        assert t.abs().sum().item() == pytest.approx(entry["abs_sum"], rel=1e-9, abs=1e-9), name
        assert t.flatten()[:4].tolist() == pytest.approx(entry["first4"], rel=1e-7, abs=0), name


# ----------------------------------------------------------------------------- parity

ADAPTER_ARRAYS = (
    ["vit_tokens_in", "spm_c2", "spm_c3"]
    + [f"int{i}_{s}" for i in range(4) for s in ("x", "cls", "c16_after_cls", "c16_out")]
    + ["int0_c8_after_extractor_first64"]
)


@pytest.mark.parametrize("name", ADAPTER_ARRAYS)
def test_adapter_internals_frame0(runs: dict, name: str) -> None:
    ref = load_npz(S3 / "adapter_f0.npz")[name]
    assert_close_elementwise(runs["f0"][name], ref, tol=_tol(ref), name=name)


@pytest.mark.parametrize("frame", [0, 1])
@pytest.mark.parametrize("name", ["ms16", "ms8", "ms4"])
def test_multiscale_features(runs: dict, frame: int, name: str) -> None:
    ref = load_npz(S3 / f"stage_f{frame}.npz")[name]
    assert_close_elementwise(runs[f"f{frame}"][name], ref, tol=_tol(ref), name=f"f{frame} {name}")


def test_capture_does_not_change_outputs(encoder: ViTAdapterEncoder, runs: dict) -> None:
    frames = load_npz(S3 / "inputs.npz")["frames"]
    with torch.inference_mode():
        plain = encoder(_model_input(frames[0]))
    for name, ours in zip(("ms16", "ms8", "ms4"), plain, strict=True):
        assert torch.equal(ours, runs["f0"][name]), name


# ----------------------------------------------------------------------------- contract

# A narrow, shallow variant: the contract does not depend on the sizes, and it builds fast.
SMALL = ViTAdapterConfig(
    embed_dim=96,
    depth=4,
    num_heads=4,
    mlp_hidden=192,
    pos_grid=5,
    interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
    deform_num_heads=12,
    conv_inplane=16,
)


def test_output_shapes_and_batch_independence() -> None:
    torch.manual_seed(0)
    enc = ViTAdapterEncoder(SMALL).eval()
    assert enc.ms_dims == (96, 96, 96)
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        f16, f8, f4 = enc(x)
        single = enc(x[1:])
    assert f16.shape == (2, 96, 4, 6)
    assert f8.shape == (2, 96, 8, 12)
    assert f4.shape == (2, 96, 16, 24)
    for ours, alone in zip((f16, f8, f4), single, strict=True):
        torch.testing.assert_close(ours[1:], alone, rtol=1e-4, atol=1e-4)


def test_rejects_sizes_off_the_patch_grid() -> None:
    enc = ViTAdapterEncoder(SMALL).eval()
    with pytest.raises(ValueError, match="multiple"):
        enc(torch.zeros(1, 3, 72, 64))


def test_vit_is_frozen_adapter_is_trainable() -> None:
    enc = ViTAdapterEncoder(SMALL)
    assert not any(p.requires_grad for p in enc.vit_module.parameters())
    assert all(p.requires_grad for n, p in enc.named_parameters() if not n.startswith("vit_"))
    assert ViTAdapterConfig(freeze_vit=False) != ViTAdapterConfig()


def test_pos_embed_kept_on_training_grid_and_resized_with_offset() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(embed_dim=8, depth=1, num_heads=2, mlp_hidden=16, pos_grid=37)
    assert vit.interpolate_pos_encoding(37, 37) is vit.pos_embed
    pos = vit.interpolate_pos_encoding(8, 14)
    assert pos.shape == (1, 1 + 8 * 14, 8)
    assert torch.equal(pos[:, 0], vit.pos_embed[:, 0])
    grid = vit.pos_embed[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(8, 14), mode="bicubic").flatten(2).transpose(1, 2)
    assert not torch.allclose(pos[:, 1:], by_size)  # the +0.1 scale factors move the samples


# ----------------------------------------------------------------------------- deformable attention


def _bilinear_zero_pad(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Direct bilinear read of ``img`` (D, H, W) at normalised (x, y), zeros outside."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5  # align_corners=False pixel coordinates
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    out = torch.zeros(img.shape[0], dtype=torch.float64)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= xx < w and 0 <= yy < h:
                out += (1 - abs(px - xx)) * (1 - abs(py - yy)) * img[:, yy, xx].double()
    return out


@pytest.mark.parametrize("core", [ms_deform_attn_core, ms_deform_attn_gather])
def test_ms_deform_attn_core_matches_direct_sampling(core) -> None:
    g = torch.Generator().manual_seed(0)
    n, m, d, p = 2, 3, 4, 2
    shapes = [(3, 5), (2, 2)]
    s = sum(h * w for h, w in shapes)
    lq = 6
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2  # some outside
    loc[0, 0, 0, 0, 0] = torch.tensor([-2.0, 3.0])  # cells away from the map: reads zero
    loc[1, 1, 1, 1, 1] = torch.tensor([0.5, -1.5])
    loc[1, 2, 2, 0, 0] = torch.tensor([0.37, 1.0 + 0.4 / 3])  # one row below, half a cell
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g)
    out = core(value, shapes, loc, weights)  # (N, Lq, M*D)
    assert out.shape == (n, lq, m * d)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                want = torch.zeros(d, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl] : starts[lvl + 1], head].T.reshape(d, h, w)
                    for pt in range(p):
                        x, y = loc[b, q, head, lvl, pt].tolist()
                        want += weights[b, q, head, lvl, pt].item() * _bilinear_zero_pad(img, x, y)
                got = out[b, q, head * d : (head + 1) * d].double()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gathered_sampling_gradients_equal_grid_samples() -> None:
    """Training goes through the gather too: gradients for the values, the sampling locations
    and the attention weights equal the grid_sample path's, points outside the maps included."""
    g = torch.Generator().manual_seed(2)
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(2, 30, 3, 4, generator=g, requires_grad=True)
    loc = (torch.rand(2, 5, 3, 2, 2, 2, generator=g) * 1.8 - 0.4).requires_grad_()
    weights = torch.rand(2, 5, 3, 2, 2, generator=g, requires_grad=True)
    target = torch.randn(2, 5, 12, generator=g)
    grads = []
    for core in (ms_deform_attn_core, ms_deform_attn_gather):
        out = core(value, shapes, loc, weights)
        grads.append(torch.autograd.grad((out * target).sum(), (value, loc, weights)))
    for ours, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ms_deform_attn_zero_offsets_read_the_reference_cell() -> None:
    """With zero offsets every point reads its reference cell centre exactly."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=3)
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    for lin in (attn.value_proj, attn.output_proj):
        torch.nn.init.eye_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    h, w = 3, 4
    feat = torch.randn(1, h * w, 8)
    ref = reference_points_for([(h, w)])[:, :, None]  # (1, 12, 1, 2)
    out = attn(torch.randn(1, h * w, 8), ref, feat, [(h, w)])
    torch.testing.assert_close(out, feat)


def test_ms_deform_attn_casts_the_query_once_under_autocast() -> None:
    """Under bf16 autocast both projections of the query get one bf16 copy of it (autocast
    would cast it for each); without autocast they get the float32 query itself."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2).eval()
    for lin in (attn.sampling_offsets, attn.attention_weights):
        torch.nn.init.normal_(lin.weight, std=0.05)
    seen: list[torch.Tensor] = []
    for lin in (attn.sampling_offsets, attn.attention_weights):
        lin.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    shapes = [(6, 8), (3, 4)]
    feat, query = torch.randn(1, 60, 64), torch.randn(1, 37, 64)
    ref_points = torch.rand(1, 37, 2, 2)
    with torch.inference_mode():
        ref = attn(query, ref_points, feat, shapes)
        assert seen[0] is query and seen[1] is query
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(query, ref_points, feat, shapes)
    assert seen[0] is seen[1] and seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0], query.to(torch.bfloat16))
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_gathered_sampling_equals_grid_sample_at_480p_sizes() -> None:
    """The default sampler against the official grid_sample path on the adapter's real shapes
    (12 heads of 64 channels, 4 points, a 30x54 map, 5x as many queries), points also outside
    the map and on its edges."""
    g = torch.Generator().manual_seed(1)
    h, w, m, d, p = 30, 54, 12, 64, 4
    lq = 5 * h * w
    value = torch.randn(1, h * w, m, d, generator=g)
    loc = torch.rand(1, lq, m, 1, p, 2, generator=g) * 1.2 - 0.1
    loc[0, :50, :, 0, 0] = 0.0  # exactly on the outer edge: half the corners read padding
    loc[0, 50:100, :, 0, 1] = 1.0
    weights = torch.softmax(torch.randn(1, lq, m, 1, p, generator=g), -1)
    official = ms_deform_attn_core(value, [(h, w)], loc, weights)
    ours = ms_deform_attn_gather(value, [(h, w)], loc, weights)
    torch.testing.assert_close(ours, official, rtol=0, atol=2e-6)
    # One point of weight 1: the bilinear interpolation itself, same corners and weights.
    one = torch.ones(1, lq, m, 1, 1)
    torch.testing.assert_close(
        ms_deform_attn_gather(value, [(h, w)], loc[..., :1, :], one),
        ms_deform_attn_core(value, [(h, w)], loc[..., :1, :], one),
        rtol=0,
        atol=1e-6,
    )


def test_fused_attention_equals_explicit() -> None:
    torch.manual_seed(0)
    attn = Attention(96, 4).eval()
    x = torch.randn(2, 37, 96)
    with torch.no_grad():
        fused = attn(x)
        attn.fused = False
        explicit = attn(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)


def test_folded_semantic_attention_equals_multihead_attention() -> None:
    torch.manual_seed(0)
    sem = SemanticCrossAttention(96, 4).eval()
    for param in sem.parameters():
        torch.nn.init.normal_(param, std=0.2)
    c, mem = torch.randn(2, 50, 96), torch.randn(2, 2, 96)
    with torch.no_grad():
        folded = sem(c, mem)
        sem.folded = False
        module = sem(c, mem)
    torch.testing.assert_close(folded, module, rtol=1e-5, atol=1e-5)


def test_token_upsampling_equals_transposed_convolution() -> None:
    """``_upsample_tokens`` == ``up(map) + c1``, values and gradients, batch of two."""
    torch.manual_seed(0)
    enc = ViTAdapterEncoder(SMALL)
    torch.nn.init.normal_(enc.up.bias, std=0.5)
    h8, w8, dim = 6, 10, SMALL.embed_dim
    tokens = torch.randn(2, h8 * w8, dim, requires_grad=True)
    c1 = torch.randn(2, dim, 2 * h8, 2 * w8)
    fmap = tokens.transpose(1, 2).reshape(2, dim, h8, w8)
    ref = enc.up(fmap) + c1
    ours = enc._upsample_tokens(tokens, c1, h8, w8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.is_contiguous()
    (grad_ref,) = torch.autograd.grad((ref * c1).sum(), tokens)
    (grad_ours,) = torch.autograd.grad((ours * c1).sum(), tokens)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-5)


def test_projected_skips_equal_projecting_the_maps() -> None:
    """``skip_proj`` folded into the encoder's last steps == the 1x1 projections applied to
    f8 and f4; the folded weights follow in-place changes of the parameters and statistics;
    in training (batch statistics) the encoder projects the maps it formed."""
    torch.manual_seed(0)
    enc = ViTAdapterEncoder(SMALL).eval()
    with torch.no_grad():
        for bn in (enc.norm1, enc.norm2):
            for t in (bn.weight, bn.bias, bn.running_mean):
                torch.nn.init.normal_(t, std=0.5)
            bn.running_var.uniform_(0.5, 2.0)
        torch.nn.init.normal_(enc.up.bias, std=0.5)
    dim = SMALL.embed_dim
    proj = (torch.nn.Conv2d(dim, 24, 1), torch.nn.Conv2d(dim, 16, 1))
    x = torch.randn(2, 3, 64, 96)

    def check() -> None:
        with torch.no_grad():
            f16, f8, f4 = enc(x)
            ours = enc(x, skip_proj=proj)
            assert "_cached_skip_folds" in enc.__dict__  # the folded order ran
            torch.testing.assert_close(ours[0], f16, rtol=0, atol=0)
            torch.testing.assert_close(ours[1], proj[0](f8), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours[2], proj[1](f4), rtol=1e-4, atol=1e-4)
        assert ours[2].shape == (2, 16, 16, 24) and ours[2].is_contiguous()

    check()
    with torch.no_grad():
        enc.norm1.running_mean.add_(1.0)
        enc.spm.fc1.bias.add_(0.5)
        proj[1].weight.mul_(2.0)
    check()  # the cached folds were refreshed (stale ones would miss by ~1)
    enc.train()
    enc.__dict__.pop("_cached_skip_folds")
    ref = enc(x)
    ours = enc(x, skip_proj=proj)
    assert "_cached_skip_folds" not in enc.__dict__
    torch.testing.assert_close(ours[2], proj[1](ref[2]), rtol=1e-5, atol=1e-5)
    assert ours[2].requires_grad


def test_bf16_autocast_keeps_the_stride4_map_in_bf16() -> None:
    """Under autocast the stride-4 sum stays in the convolutions' dtype (the float32 ViT map
    added to it used to promote the whole largest map and copy it back for the decoder)."""
    torch.manual_seed(0)
    enc = ViTAdapterEncoder(SMALL).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        ref = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = enc(x)
    assert out[2].dtype == torch.bfloat16
    for ours, full in zip(out, ref, strict=True):
        scale = float(full.abs().max())
        torch.testing.assert_close(ours.float(), full, rtol=0.05, atol=0.05 * scale)


def test_blocked_attention_equals_sdpa() -> None:
    """Each head in blocks of queries (the last one partial), and each head whole, give the
    whole softmax attention; so do keys of another length than the queries."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(blocked_attention(q, k, v, 0.3, max_scores=128 * 300), ref)
    torch.testing.assert_close(blocked_attention(q, k, v, 0.3), ref)
    k2, v2 = torch.randn(2, 3, 70, 16), torch.randn(2, 3, 70, 16)
    ref2 = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, scale=0.3)
    torch.testing.assert_close(blocked_attention(q, k2, v2, 0.3, max_scores=50 * 70), ref2)
    half = blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=0.02, atol=0.02)


def test_attention_under_bf16_autocast_close_to_float32() -> None:
    torch.manual_seed(0)
    attn = Attention(96, 4).eval()
    x = torch.randn(1, 200, 96)
    with torch.inference_mode():
        ref = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x)
    scale = float(ref.abs().max())
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02 * scale)
