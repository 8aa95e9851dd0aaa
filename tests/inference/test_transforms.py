"""Pure transforms: padding, resizing, aggregation, input conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s3cli.inference.transforms import (
    Padding,
    aggregate,
    hflip,
    image_to_tensor,
    index_mask_to_tensor,
    pad_to_multiple,
    resize_index_mask,
    short_side_size,
    unpad,
)


@pytest.mark.parametrize(
    "divisor,expected",
    [(16, Padding(5, 6, 4, 4)), (32, Padding(5, 6, 4, 4)), (8, Padding(1, 2, 0, 0))],
)
def test_pad_split_smaller_half_first(divisor: int, expected: Padding) -> None:
    x = torch.rand(3, 120, 213)
    padded, pad = pad_to_multiple(x, divisor)
    assert pad == expected
    assert padded.shape[-2] % divisor == 0 and padded.shape[-1] % divisor == 0
    assert torch.equal(padded[:, pad.top : pad.top + 120, pad.left : pad.left + 213], x)
    assert torch.equal(unpad(padded, pad), x)
    assert padded[:, :, : pad.left].abs().sum() == 0


def test_pad_noop_and_integer_masks() -> None:
    x = torch.ones(32, 48, dtype=torch.int64)
    padded, pad = pad_to_multiple(x, 16)
    assert padded is x and pad == Padding(0, 0, 0, 0)
    assert torch.equal(unpad(padded, pad), x)
    m, _ = pad_to_multiple(torch.full((5, 7), 3, dtype=torch.int64), 4)
    assert m.dtype == torch.int64 and m.shape == (8, 8) and int(m.sum()) == 3 * 35


def test_short_side_size() -> None:
    assert short_side_size(480, 854, -1) is None
    assert short_side_size(480, 854, 480) is None
    assert short_side_size(960, 1708, 480) == (480, 854)
    assert short_side_size(1000, 500, 100) == (200, 100)


def test_resize_index_mask_keeps_labels() -> None:
    mask = torch.zeros(40, 60, dtype=torch.int64)
    mask[10:30, 20:40] = 7
    out = resize_index_mask(mask, (20, 30))
    assert out.dtype == torch.int64 and out.shape == (20, 30)
    assert set(out.unique().tolist()) == {0, 7}
    assert int((out == 7).sum()) == 100


def test_aggregate_matches_definition() -> None:
    p = torch.tensor([[0.2, 1.0], [0.5, 0.0]])  # (N=2, 2 pixels)
    logits = aggregate(p, dim=0)
    bg = (1 - p).prod(0, keepdim=True)
    full = torch.cat([bg, p], 0).clamp(1e-7, 1 - 1e-7)
    assert torch.allclose(logits, torch.log(full / (1 - full)))
    assert logits.shape == (3, 2) and logits.dtype == torch.float32


def test_hflip() -> None:
    x = torch.arange(6.0).view(1, 2, 3)
    assert torch.equal(hflip(x), x[..., [2, 1, 0]])


def test_image_to_tensor_uint8_and_float_agree() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    a = image_to_tensor(arr, device=torch.device("cpu"), dtype=torch.float32)
    ref = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert torch.equal(a, ref)
    b = image_to_tensor(ref.clone(), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        image_to_tensor(arr.astype(np.float32), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError):
        image_to_tensor(arr[..., :2], device=torch.device("cpu"), dtype=torch.float32)


def test_index_mask_to_tensor() -> None:
    m = index_mask_to_tensor(
        np.array([[0, 3], [255, 1]], dtype=np.uint8), device=torch.device("cpu")
    )
    assert m.dtype == torch.int64 and m.tolist() == [[0, 3], [255, 1]]
    with pytest.raises(ValueError):
        index_mask_to_tensor(torch.zeros(2, 2), device=torch.device("cpu"))
    with pytest.raises(ValueError):
        index_mask_to_tensor(np.zeros((1, 2, 2), dtype=np.int64), device=torch.device("cpu"))
