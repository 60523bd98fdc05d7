"""History tokenizer (docs/alpamayo-r1-prompt.md §3.1) and placeholder fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.history_tokens import fuse_history, history_token_ids


def _straight_10mps() -> np.ndarray:
    """The doc's example: 10 m/s straight with y = 0.02 t^2, t = -1.5 .. 0 s."""
    t = np.arange(-15, 1) * 0.1
    return np.stack([10 * t, 0.02 * t**2, 0 * t], axis=1)  # (16, 3)


def test_doc_example_bins():
    bins = history_token_ids(_straight_10mps())
    # first delta is the oldest position itself: x = -15 m clips to bin 0; y = 0.045 -> 505; z = 0 -> 500
    expected = [0, 505, 500] + [624, 499, 500] * 15
    assert bins.dtype == np.int64 and bins.tolist() == expected


def test_zero_history_ties_round_to_even():
    # d = 0 gives exactly 499.5 on every axis, which round-half-to-even sends to 500
    assert history_token_ids(np.zeros((16, 3))).tolist() == [500] * 48


def test_exact_tie_rounds_down_to_even():
    """A float32 delta whose scaled value is exactly 60.5: half-to-even gives 60 (half-up would give 61)."""
    dz = np.float32(-8.788789)
    assert (dz - np.float32(-10)) / np.float32(20) * np.float32(999) == np.float32(60.5)
    hist = np.zeros((16, 3))
    hist[0, 2] = dz  # d_0 = H[0], d_1 = -H[0]
    assert (-dz - np.float32(-10)) / np.float32(20) * np.float32(999) == np.float32(938.5)  # 999 - 60.5
    bins = history_token_ids(hist)
    assert bins[2] == 60
    assert bins[5] == 938  # the mirrored delta is a tie too (Python's float64 round would give 939)


def test_clipping_at_range_ends():
    hist = np.zeros((16, 3))
    hist[0] = [100.0, -100.0, 50.0]
    bins = history_token_ids(hist)
    assert bins[:3].tolist() == [999, 0, 999]
    assert bins[3:6].tolist() == [0, 999, 0]


def test_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(16, 3\)"):
        history_token_ids(np.zeros((15, 3)))


def test_fuse_history_fills_placeholders_in_order():
    ph, start = 7, 1000
    row = [1, 2] + [ph] * 48 + [3]
    bins = np.arange(48) * 20
    out = fuse_history(torch.tensor([row]), bins, start, ph)
    assert out.tolist() == [[1, 2] + (start + bins).tolist() + [3]]
    # 1-D input, and the input is not modified
    row_t = torch.tensor(row)
    assert fuse_history(row_t, bins, start, ph).tolist() == out[0].tolist()
    assert row_t.tolist() == row


def test_fuse_history_batch_with_per_row_bins():
    ph, start = 7, 1000
    ids = torch.tensor([[0] + [ph] * 48, [ph] * 48 + [0]])
    bins = np.stack([np.arange(48), np.arange(48)[::-1]])
    out = fuse_history(ids, bins, start, ph)
    assert out[0, 1:].tolist() == (start + np.arange(48)).tolist()
    assert out[1, :48].tolist() == (start + np.arange(48)[::-1]).tolist()


def test_fuse_history_rejects_miscounted_placeholders_and_bad_bins():
    with pytest.raises(ValueError, match="48 history placeholders"):
        fuse_history(torch.tensor([[7] * 47]), np.zeros(48, np.int64), 1000, 7)
    with pytest.raises(ValueError, match="bins must lie"):
        fuse_history(torch.tensor([[7] * 48]), np.full(48, 1000), 1000, 7)
