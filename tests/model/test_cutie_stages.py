"""Per-stage parity of cutie-base with the official code (shared/fixtures/cutie/stages.npz)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from s3cli.model.layers.aggregate import aggregate
from s3cli.model.registry import build_network
from tests.conftest import FIXTURES, assert_close, load_npz, require_shared

CUTIE = FIXTURES / "cutie"


def _pad16(x: torch.Tensor) -> torch.Tensor:
    # 120x213 -> 128x224: left 5, right 6, top 4, bottom 4 (smaller half first).
    return torch.nn.functional.pad(x, (5, 6, 4, 4))


@pytest.fixture(scope="module")
def net():
    """The official stage contract: encode_image returns the encoder's f8 and f4, segment
    projects them (``project_skips_early`` off; the default early projection is checked in
    test_stages too)."""
    torch.manual_seed(0)
    net = build_network("cutie-base", synthetic=True)
    net.project_skips_early = False
    return net


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return load_npz(CUTIE / "stages.npz")


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return load_npz(CUTIE / "inputs.npz")


def _frame(inputs, t: int) -> torch.Tensor:
    img = torch.from_numpy(inputs["frames"][t]).permute(2, 0, 1).float() / 255
    return _pad16(img.unsqueeze(0))


@pytest.mark.parametrize(
    "name,keyfile", [("cutie-base", "keys.json"), ("cutie-small", "keys_small.json")]
)
def test_synthetic_weights_match_fingerprints(name: str, keyfile: str) -> None:
    spec = json.loads(require_shared(CUTIE / keyfile).read_text())["keys"]
    sd = build_network(name, synthetic=True).state_dict()
    assert [k["key"] for k in spec] == list(sd), "state_dict keys or their order differ"
    for k in spec:
        t = sd[k["key"]].double()
        assert list(t.shape) == k["shape"], k["key"]
        assert t.sum().item() == pytest.approx(k["sum"], rel=1e-9, abs=1e-9), k["key"]
        if "abs_sum" in k:  # integer counters carry only their sum
            assert t.abs().sum().item() == pytest.approx(k["abs_sum"], rel=1e-9), k["key"]
            first = t.flatten()[:4].float().numpy()
            np.testing.assert_array_equal(first, np.float32(k["first"]), err_msg=k["key"])


@torch.inference_mode()
def test_stages(net, ref, inputs) -> None:
    # Frame 0: encode, key, memorise the two-object mask.
    img0 = _frame(inputs, 0)
    (f16, f8, f4), pix = net.encode_image(img0)
    for name, ours in [("f16", f16), ("f8", f8), ("f4", f4), ("pix_feat", pix)]:
        assert_close(ours, ref[f"f0_{name}"], name=f"f0_{name}")
    key, shrink, sel = net.transform_key(f16)
    assert_close(key, ref["f0_key"], name="f0_key")
    assert_close(shrink, ref["f0_shrinkage"], name="f0_shrinkage")
    assert_close(sel, ref["f0_selection"], name="f0_selection")

    mask = _pad16(torch.from_numpy(inputs["mask_2obj"]).long()[None])[0]
    one_hot = torch.stack([(mask == i).float() for i in (1, 2)])  # (2, H, W)
    last_mask = torch.softmax(aggregate(one_hot, dim=0), dim=0)[1:].unsqueeze(0)
    assert_close(last_mask, ref["f0_last_mask"], name="f0_last_mask")
    sensory = torch.zeros(1, 2, 256, 8, 14)
    value, sensory, summaries, logits = net.encode_mask(
        img0, pix, sensory, last_mask, need_weights=True
    )
    assert_close(value, ref["f0_msk_value"], name="f0_msk_value")
    assert_close(sensory, ref["f0_sensory_out"], name="f0_sensory_out")
    assert_close(summaries, ref["f0_obj_summaries"], name="f0_obj_summaries")
    assert_close(logits, ref["f0_obj_summary_logits"], name="f0_obj_summary_logits")

    # Frame 1: read the memory and segment, stage by stage from our own outputs.
    img1 = _frame(inputs, 1)
    (g16, g8, g4), pix1 = net.encode_image(img1)
    assert_close(g16, ref["f1_f16"], name="f1_f16")
    key1, _, sel1 = net.transform_key(g16)
    assert_close(key1, ref["f1_key"], name="f1_key")

    mk, ms = key.flatten(2), shrink.flatten(2)  # (1, 64, 112), (1, 1, 112)
    qk, qe = key1.flatten(2), sel1.flatten(2)
    sim = -(
        (mk.pow(2).transpose(1, 2) @ qe)
        - 2 * (mk.transpose(1, 2) @ (qk * qe))
        + (qe * qk.pow(2)).sum(1, keepdim=True)
    ) * ms.transpose(1, 2) / 8
    assert_close(sim, ref["f1_similarity"], name="f1_similarity")
    readout = torch.from_numpy(ref["f1_readout"])
    pixel_readout = net.pixel_fusion(
        pix1, torch.from_numpy(ref["f1_visual_readout"]), sensory, last_mask
    )
    assert_close(pixel_readout, ref["f1_pixel_readout"], name="f1_pixel_readout")
    readout, aux = net.readout_query(pixel_readout, summaries.unsqueeze(2))
    assert_close(readout, ref["f1_readout"], name="f1_readout")
    assert_close(torch.stack(aux["logits"]), ref["f1_ot_aux_logits"], name="f1_ot_aux_logits")
    new_sensory, logits1, prob1 = net.segment([g16, g8, g4], readout, sensory)
    assert_close(new_sensory, ref["f1_sensory_out"], name="f1_sensory_out")
    assert_close(logits1, ref["f1_logits"], name="f1_logits")
    assert_close(prob1, ref["f1_prob"], name="f1_prob")

    # The default: the decoder's skip projections applied in encode_image.
    net.project_skips_early = True
    try:
        (e16, e8, e4), _ = net.encode_image(img1)
        early_sensory, early_logits, early_prob = net.segment([e16, e8, e4], readout, sensory)
    finally:
        net.project_skips_early = False
    proj = net.mask_decoder.decoder_feat_proc.transforms
    for ours, conv, name in ((e8, proj[0], "f1_f8"), (e4, proj[1], "f1_f4")):
        x = torch.from_numpy(np.asarray(ref[name], dtype=np.float64))
        w, b = conv.weight.double().flatten(1), conv.bias.double().view(1, -1, 1, 1)
        projected = (torch.einsum("oc,bchw->bohw", w, x) + b).numpy()
        assert_close(ours, projected, name=f"{name} projected")
    assert_close(early_sensory, ref["f1_sensory_out"], name="f1_sensory_out (early skips)")
    assert_close(early_logits, ref["f1_logits"], name="f1_logits (early skips)")
    assert_close(early_prob, ref["f1_prob"], name="f1_prob (early skips)")
