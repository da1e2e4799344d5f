"""The window / causal / padding rule itself: fastattn.masks."""

import pytest
import torch

from fastattn import masks


def _rows(mask):
    return [" ".join(str(int(x)) for x in row) for row in mask.tolist()]


def test_normalise_window_forms():
    assert masks.normalise_window(None) == (-1, -1)
    assert masks.normalise_window(None, causal=True) == (-1, 0)
    assert masks.normalise_window(4) == (4, 4)
    assert masks.normalise_window((3, 7)) == (3, 7)
    assert masks.normalise_window((3, 7), causal=True) == (3, 0)
    assert masks.normalise_window([-1, 5]) == (-1, 5)


@pytest.mark.parametrize("window, error", [(-2, ValueError), ((1, -5), ValueError), ((1, 2, 3), ValueError),
                                           (1.5, TypeError), ((True, 1), TypeError), ("3", TypeError)])
def test_normalise_window_rejects(window, error):
    with pytest.raises(error, match="window"):
        masks.normalise_window(window)


def test_docstring_examples():
    # Nq = 2, Nk = 5: query rows sit at positions 3 and 4 (bottom-right alignment).
    assert _rows(masks.materialize(2, 5, causal=True)) == ["1 1 1 1 0", "1 1 1 1 1"]
    assert _rows(masks.materialize(2, 5, window=(1, 0))) == ["0 0 1 1 0", "0 0 0 1 1"]
    assert _rows(masks.materialize(5, 5, window=(1, 1))) == [
        "1 1 0 0 0", "1 1 1 0 0", "0 1 1 1 0", "0 0 1 1 1", "0 0 0 1 1"]


@pytest.mark.parametrize("nq, nk", [(1, 1), (7, 7), (3, 9), (9, 3)])
def test_causal_equals_window_nk_minus_1(nq, nk):
    assert torch.equal(masks.materialize(nq, nk, causal=True), masks.materialize(nq, nk, window=(nk - 1, 0)))


def test_window_covers_at_most_left_plus_right_plus_one():
    mask = masks.materialize(40, 40, window=(3, 7))
    assert mask.sum(-1).max().item() == 3 + 7 + 1


def test_padding_hides_keys_for_every_query():
    padding = torch.tensor([[False, False, True], [True, False, False]])
    mask = masks.materialize(2, 3, key_padding_mask=padding)
    assert mask.shape == (2, 1, 2, 3)
    assert not mask[0, 0, :, 2].any() and not mask[1, 0, :, 0].any()
    assert mask[0, 0, :, :2].all()


@pytest.mark.parametrize("nq, nk", [(5, 5), (3, 11), (11, 3), (1, 9)])
@pytest.mark.parametrize("left, right", [(-1, -1), (-1, 0), (0, 0), (1, 0), (3, 7), (2, -1), (20, 20)])
def test_ranges_agree_with_dense_mask(nq, nk, left, right):
    dense = masks.materialize(nq, nk, window=(left, right))
    for i in range(nq):
        first, end = masks.visible_key_range(i, nq, nk, left, right)
        expected = [j for j in range(nk) if dense[i, j]]
        assert expected == list(range(first, end))
    for j in range(nk):
        first, end = masks.visible_query_range(j, nq, nk, left, right)
        assert [i for i in range(nq) if dense[i, j]] == list(range(first, end))
    assert masks.visible_key_count(nq, nk, left, right) == int(dense.sum())
