"""``classify_labels``: class-balanced matching, against soft top-k propagation."""

from __future__ import annotations

import math

import torch

from s3cli.lite.propagation import classify_labels, propagate_labels


def _memory(object_affinity: float, background_affinity: float, n_background: int):
    """One query (1, 1, 2) = e1; one object cell and ``n_background`` background cells whose
    keys have the given affinities to it."""
    query = torch.tensor([[[1.0, 0.0]]])

    def unit(cos: float) -> list[float]:
        return [cos, math.sqrt(1 - cos * cos)]

    keys = torch.tensor([unit(object_affinity)] + [unit(background_affinity)] * n_background)
    values = torch.zeros(1 + n_background, 2)
    values[0, 1] = 1
    values[1:, 0] = 1
    index = torch.arange(1 + n_background)[None]  # (A = 1, R)
    return query, keys, values, index


def test_a_small_object_is_not_outvoted() -> None:
    query, keys, values, index = _memory(1.0, 0.9, 9)
    soft = propagate_labels(query, keys, values, index, top_k=10, temperature=0.05)
    assert soft[0, 0, 0] > 0.5  # nine close background cells outweigh the best match
    out = classify_labels(query, keys, values, index, top_k=1, temperature=0.05)
    expected = 1 / (1 + math.exp(-0.1 / 0.05))
    torch.testing.assert_close(out[0, 0], torch.tensor([1 - expected, expected]))
    # top_k 3: the object has one cell, its other two places count at the pool's lowest.
    out = classify_labels(query, keys, values, index, top_k=3, temperature=0.05)
    assert 0.5 < float(out[0, 0, 1]) < expected
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1))


def test_unknown_and_empty_cells_count_for_no_label() -> None:
    query, keys, values, index = _memory(0.5, 0.9, 3)
    # Two frames of two cells: frame 0 (cells 0, 1) does not know background.
    valid = torch.tensor([[False, True], [True, True]])
    out = classify_labels(query, keys, values, index, 1, 0.05, valid, frame_cells=2)
    # Cell 1 (background, 0.9) is unknown: background is cell 2 or 3 (0.9) all the same.
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(1 / (1 + math.exp(-0.4 / 0.05))))
    # Cells without label mass (padding) are never a label's match.
    values[2:] = 0
    out = classify_labels(query, keys, values, index, 1, 0.05, valid, frame_cells=2)
    assert float(out[0, 0, 1]) > 0.99


def test_window_topk_in_chunks_equals_one_topk(monkeypatch) -> None:
    """Chunked matching (a few tiles at a time) picks the same cells as one top-k over the
    whole (A, Q, R) tensor (affinities equal up to the matrix product's rounding), excluded
    cells never picked."""
    from s3cli.lite import propagation

    gen = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(500, 16, generator=gen), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(7, 9, 16, generator=gen), dim=-1)
    index = torch.randint(0, 500, (7, 40), generator=gen)
    exclude = torch.rand(500, generator=gen) < 0.3
    affinity = propagation.window_affinity(queries, keys, index)
    affinity.masked_fill_(exclude[index][:, None, :], -2.0)
    expected = torch.topk(affinity, 12, dim=-1)
    monkeypatch.setattr(propagation, "CHUNK_ELEMENTS", 2 * 9 * 40)  # 2 tiles per chunk
    top, pos = propagation.window_topk(queries, keys, index, 12, exclude=exclude)
    torch.testing.assert_close(top, expected.values, rtol=0, atol=1e-6)
    assert torch.equal(pos, expected.indices)
    picked = torch.gather(index, 1, pos.reshape(7, -1))
    assert not bool(exclude[picked].any())
