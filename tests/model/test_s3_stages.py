"""Per-stage parity of s3-base with the official S3 code (shared/fixtures/s3/*.npz).

Tolerances are the fixture README's: float32 arrays |ours - ref| <= 1e-3 * (1 + |ref|);
arrays stored in float16, or computed from float16-stored inputs, 2e-3 * (1 + |ref|);
integer and boolean arrays exact.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from s3cli.model.registry import build_network
from tests.conftest import FIXTURES, assert_close_elementwise, load_npz, require_shared

S3 = FIXTURES / "s3"
F32, F16 = 1e-3, 2e-3


def _check(ours, ref: np.ndarray, name: str, tol: float | None = None) -> None:
    if ref.dtype in (np.bool_, np.int64, np.int32, np.uint8):
        ours = ours.detach().cpu().numpy() if hasattr(ours, "detach") else np.asarray(ours)
        np.testing.assert_array_equal(ours.astype(ref.dtype), ref, err_msg=name)
        return
    if tol is None:
        tol = F16 if ref.dtype == np.float16 else F32
    assert_close_elementwise(ours, ref, tol=tol, name=name)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


@pytest.fixture(scope="module")
def net():
    """The network with the official stage contract: encode_image returns the encoder's f8
    and f4 and segment projects them (``project_skips_early`` off). The default, early
    projection is checked against the same arrays by the tests marked so."""
    net = build_network("s3-base", synthetic=True)
    net.project_skips_early = False
    return net


@contextlib.contextmanager
def _early_skips(net):
    net.project_skips_early = True
    try:
        yield net
    finally:
        net.project_skips_early = False


def _project(conv: torch.nn.Conv2d, ref: np.ndarray) -> np.ndarray:
    """A 1x1 projection of a recorded map ``(B, C, H, W)``, in float64."""
    w = conv.weight.detach().double().flatten(1)
    x = torch.from_numpy(np.asarray(ref, dtype=np.float64))
    out = torch.einsum("oc,bchw->bohw", w, x) + conv.bias.detach().double().view(1, -1, 1, 1)
    return out.numpy()


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return load_npz(S3 / "inputs.npz")


def _frame(inputs, t: int) -> torch.Tensor:
    img = torch.from_numpy(inputs["frames"][t]).permute(2, 0, 1).float() / 255
    return torch.nn.functional.pad(img.unsqueeze(0), (5, 6, 4, 4))  # 120x213 -> 128x224


def test_synthetic_weights_match_fingerprints() -> None:
    spec = json.loads(require_shared(S3 / "keys.json").read_text())["keys"]
    sd = build_network("s3-base", synthetic=True).state_dict()
    assert sorted(k["name"] for k in spec) == sorted(sd), "state_dict keys differ"
    for k in spec:
        t = sd[k["name"]].double()
        assert list(t.shape) == k["shape"], k["name"]
        assert t.sum().item() == pytest.approx(k["sum"], rel=1e-9, abs=1e-9), k["name"]
        if "abs_sum" in k:
            assert t.abs().sum().item() == pytest.approx(k["abs_sum"], rel=1e-9), k["name"]
            first = t.flatten()[:4].float().numpy()
            np.testing.assert_array_equal(first, np.float32(k["first4"]), err_msg=k["name"])


@pytest.mark.parametrize("stage,frame", [("stage_f0", 0), ("stage_f1", 1)])
@torch.inference_mode()
def test_encode_image_and_key(net, inputs, stage: str, frame: int) -> None:
    ref = load_npz(S3 / f"{stage}.npz")
    (f16, f8, f4), pix = net.encode_image(_frame(inputs, frame))
    _check(f16, ref["ms16"], "ms16")
    _check(f8, ref["ms8"], "ms8")
    _check(f4, ref["ms4"], "ms4")
    _check(pix, ref["pix_feat"], "pix_feat")
    with _early_skips(net):
        (e16, e8, e4), _ = net.encode_image(_frame(inputs, frame))
    # the early projection (folded into the encoder) against the recorded maps, projected
    proj = net.mask_decoder.decoder_feat_proc.transforms
    _check(e16, ref["ms16"], "ms16 (early skips)")
    for ours, name, conv in ((e8, "ms8", proj[0]), (e4, "ms4", proj[1])):
        tol = F16 if ref[name].dtype == np.float16 else F32
        _check(ours, _project(conv, ref[name]), f"projected {name}", tol)
    key, shrink, sel = net.transform_key(_t(ref["ms16"]))
    _check(key, ref["key"], "key")
    _check(shrink, ref["shrinkage"], "shrinkage")
    _check(sel, ref["selection"], "selection")


@pytest.mark.parametrize("stage,frame", [("stage_f0", 0), ("stage_f1_encode_mask", 1)])
@torch.inference_mode()
def test_encode_mask(net, inputs, stage: str, frame: int) -> None:
    ref = load_npz(S3 / f"{stage}.npz")
    pix = load_npz(S3 / ("stage_f0.npz" if frame == 0 else "stage_f1.npz"))["pix_feat"]
    value, sensory, summaries, logits = net.encode_mask(
        _frame(inputs, frame),
        _t(pix),
        _t(ref["enc_sensory_in"]),
        _t(ref["enc_masks_in"]),
        need_weights=True,
    )
    _check(value, ref["mask_value"], "mask_value")
    _check(sensory, ref["enc_sensory_out"], "enc_sensory_out")
    _check(summaries, ref["obj_summaries"], "obj_summaries")
    _check(logits, ref["summarizer_logits"], "summarizer_logits")


def _capture_blocks(net) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks on the object transformer's blocks and discriminative queries."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for i, blk in enumerate(net.object_transformer.blocks):

        def dq_hook(mod, args, kwargs, out, i=i):
            seen[f"dq{i}_q_in"] = args[0].clone()
            seen[f"dq{i}_attn_mask"] = kwargs["attn_mask"].clone()
            seen[f"dq{i}_out"], seen[f"dq{i}_argmax"] = out[0].clone(), out[1].clone()
            if i == 0:
                seen["dq0_pixel_in"], seen["dq0_query_pos"] = args[1].clone(), args[2].clone()
                seen["dq0_pixel_pos"] = args[3].clone()

        def blk_hook(mod, args, out, i=i):
            seen[f"blk{i}_query_out"], seen[f"blk{i}_pixel_out"] = out[0].clone(), out[1].clone()

        handles.append(blk.read_from_pixel.register_forward_hook(dq_hook, with_kwargs=True))
        handles.append(blk.register_forward_hook(blk_hook))

    def dec_hook(mod, args, kwargs, out):
        seen["seg_lowres_logits"] = out[1].clone()

    handles.append(net.mask_decoder.register_forward_hook(dec_hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("stage", ["stage_f0_selfread", "stage_f1"])
@torch.inference_mode()
def test_readout_transformer_and_segment(net, stage: str) -> None:
    """From the recorded memory readout onwards: fusion, object transformer (every
    discriminative-query internal, argmax indices exact) and the decoder."""
    ref = load_npz(S3 / f"{stage}.npz")
    f0 = load_npz(S3 / "stage_f0.npz")
    ms = f0 if stage == "stage_f0_selfread" else ref
    seen, handles = _capture_blocks(net)
    try:
        pixel_readout = net.pixel_fusion(
            _t(ms["pix_feat"]),
            _t(ref["visual_readout"]),
            _t(ref["fusion_sensory_in"]),
            _t(ref["fusion_last_mask"]),
        )
        _check(pixel_readout, ref["pixel_readout"], "pixel_readout")
        readout, aux = net.readout_query(pixel_readout, _t(ref["obj_memory"]))
        _check(readout, ref["ot_readout"], "ot_readout")
        _check(torch.stack(aux["logits"]), ref["ot_aux_logits"], "ot_aux_logits")
        feats = [_t(ms["ms16"]), _t(ms["ms8"]), _t(ms["ms4"])]
        sensory, logits, prob = net.segment(feats, readout, _t(ref["seg_sensory_in"]))
    finally:
        for h in handles:
            h.remove()
    for name, arr in ref.items():
        if name.startswith(("dq", "blk")):
            ours = seen[name]
            if name.endswith("attn_mask"):
                ours = ours.view(arr.shape)
            _check(ours, arr, name)
    # The decoder reads float16-stored skip features: the README's chained tolerance applies.
    _check(seen["seg_lowres_logits"], ref["seg_lowres_logits"], "seg_lowres_logits", F16)
    _check(sensory, ref["seg_sensory_out"], "seg_sensory_out", F16)
    _check(logits, ref["seg_logits"], "seg_logits", F16)
    _check(prob, ref["seg_prob"], "seg_prob", F16)
    # The same decoder on skip features projected before it (the default, early projection).
    proj = net.mask_decoder.decoder_feat_proc.transforms
    early = [_t(ms["ms16"]), _t(_project(proj[0], ms["ms8"])), _t(_project(proj[1], ms["ms4"]))]
    with _early_skips(net):
        sensory, logits, prob = net.segment(early, readout, _t(ref["seg_sensory_in"]))
    _check(sensory, ref["seg_sensory_out"], "seg_sensory_out (early skips)", F16)
    _check(logits, ref["seg_logits"], "seg_logits (early skips)", F16)
    _check(prob, ref["seg_prob"], "seg_prob (early skips)", F16)
