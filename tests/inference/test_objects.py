"""Object ids <-> channels, and the probability -> mask helpers."""

from __future__ import annotations

import pytest
import torch

from s3cli.inference.objects import (
    ObjectRegistry,
    channel_argmax,
    index_mask_to_one_hot,
    probabilities_to_binary_masks,
    probabilities_to_index_mask,
)


def test_registry_keeps_first_appearance_order() -> None:
    reg = ObjectRegistry()
    assert reg.add([7, 3]) == [7, 3]
    assert reg.add([3, 42, 1]) == [42, 1]
    assert reg.object_ids == [7, 3, 42, 1]
    assert reg.channel_of(42) == 2 and reg.has_all([1, 7]) and not reg.has_all([1, 8])
    assert reg.delete([3, 99]) == [1]
    assert reg.object_ids == [7, 42, 1] and reg.num_objects == 3
    assert reg.add([3]) == [3]
    assert reg.object_ids == [7, 42, 1, 3]


@pytest.mark.parametrize("bad", [[0], [-2], [1, 1], [1.5]])
def test_registry_rejects_bad_ids(bad: list) -> None:
    with pytest.raises(ValueError):
        ObjectRegistry().add(bad)


def test_index_mask_helpers_with_non_contiguous_ids() -> None:
    mask = torch.tensor([[0, 7, 7], [42, 42, 0]])
    one_hot = index_mask_to_one_hot(mask, [42, 7])
    assert one_hot.shape == (2, 2, 3)
    assert one_hot[0].tolist() == [[0, 0, 0], [1, 1, 0]]
    assert index_mask_to_one_hot(mask, []).shape == (0, 2, 3)

    # probabilities: background, object 42, object 7 (channel order of the tracker)
    prob = torch.cat([1 - one_hot.sum(0, keepdim=True), one_hot], 0) * 0.8 + 0.05
    idx = probabilities_to_index_mask(prob, [42, 7])
    assert torch.equal(idx, mask)
    binary = probabilities_to_binary_masks(prob)
    assert binary.dtype == torch.bool and torch.equal(binary, one_hot.bool())
    with pytest.raises(ValueError):
        probabilities_to_index_mask(prob, [42])


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_channel_argmax_equals_torch_argmax_ties_included(channels: int) -> None:
    g = torch.Generator().manual_seed(channels)
    # coarse values: many exact ties between channels, which must go to the lower channel
    prob = torch.randint(0, 4, (channels, 37, 53), generator=g).float() / 4
    assert torch.equal(channel_argmax(prob), torch.argmax(prob, dim=0))
    soft = torch.rand(channels, 37, 53, generator=g).softmax(0)
    assert torch.equal(channel_argmax(soft), torch.argmax(soft, dim=0))
    assert channel_argmax(soft).dtype == torch.int64
