"""Selection rules: hand-worked cases, validation, and properties over random scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.bitmask import mask_keeps_any, mask_nbytes, pack_mask, unpack_mask
from shared.errors import ConfigError
from shared.selection import SUM_TOLERANCE, Selection, SelectionRule, select, select_batch

PROPS = settings(max_examples=150, deadline=None)

# s = [0.1, 0.4, 0.2, 0.3]: descending order is patch 1 (0.4), 3 (0.3), 2 (0.2), 0 (0.1),
# cumulative mass 0.4, 0.7, 0.9, 1.0.
S = np.array([0.1, 0.4, 0.2, 0.3])


def kept(scores: np.ndarray | list[float], kind: str, value: float, min_patches: int = 1) -> list[int]:
    rule = SelectionRule(kind, value, min_patches)  # type: ignore[arg-type]
    return select(np.asarray(scores, dtype=np.float64), rule).indices.tolist()


@pytest.mark.parametrize(
    ("kind", "value", "min_patches", "expected"),
    [
        ("topk", 1, 1, [1]),
        ("topk", 2, 1, [1, 3]),
        ("topk", 3, 0, [1, 2, 3]),
        ("topk", 9, 1, [0, 1, 2, 3]),  # k > N: every patch
        ("threshold", 0.2, 1, [1, 2, 3]),  # s_i ≥ δ includes the 0.2 patch
        ("threshold", 0.3, 1, [1, 3]),
        ("threshold", 0.0, 1, [0, 1, 2, 3]),
        ("threshold", 0.5, 1, [1]),  # nothing ≥ 0.5: degenerate, top patch
        ("threshold", 0.5, 2, [1, 3]),  # degenerate, top min_patches
        ("threshold", 0.5, 0, []),  # empty allowed
        ("sum_threshold", 0.75, 1, [1, 3]),  # 0.4 + 0.3 ≤ 0.75 < 0.9
        ("sum_threshold", 0.7, 1, [1, 3]),  # exactly δ_sum (0.4 + 0.3 rounds above 0.7 in float64)
        ("sum_threshold", 0.69, 1, [1]),
        ("sum_threshold", 0.9, 1, [1, 2, 3]),
        ("sum_threshold", 1.0, 1, [0, 1, 2, 3]),  # the whole mass, despite rounding
        ("sum_threshold", 0.3, 1, [1]),  # top patch alone exceeds δ_sum: degenerate
        ("sum_threshold", 0.3, 3, [1, 2, 3]),
        ("sum_threshold", 0.3, 0, []),
        ("sum_threshold", 0.75, 3, [1, 2, 3]),  # min_patches above the prefix length wins
    ],
)
def test_rules_on_hand_worked_scores(kind: str, value: float, min_patches: int, expected: list[int]) -> None:
    assert kept(S, kind, value, min_patches) == expected


def test_sum_threshold_uses_share_of_total_mass() -> None:
    # Unnormalised scores 1, 4, 2, 3 (total 10) select like 0.1, 0.4, 0.2, 0.3.
    assert kept([1.0, 4.0, 2.0, 3.0], "sum_threshold", 0.75) == [1, 3]
    assert kept([1.0, 4.0, 2.0, 3.0], "sum_threshold", 0.95) == [1, 2, 3]


def test_all_zero_scores_are_degenerate() -> None:
    assert kept([0.0, 0.0, 0.0], "sum_threshold", 0.5) == [0]
    assert kept([0.0, 0.0, 0.0], "sum_threshold", 0.5, min_patches=2) == [0, 1]
    assert kept([0.0, 0.0, 0.0], "threshold", 0.1) == [0]


def test_ties_rank_lower_index_first() -> None:
    flat = [0.25, 0.25, 0.25, 0.25]
    assert kept(flat, "topk", 2) == [0, 1]
    assert kept(flat, "sum_threshold", 0.5) == [0, 1]
    assert kept(flat, "sum_threshold", 0.6) == [0, 1]
    assert kept(flat, "threshold", 0.25) == [0, 1, 2, 3]
    # Tie at the top, nothing reaches δ: min_patches cuts the tie at the lower index.
    assert kept([0.1, 0.45, 0.45], "threshold", 0.5) == [1]
    assert kept([0.1, 0.45, 0.45], "topk", 1) == [1]
    # A later, higher score still ranks first.
    assert kept([0.2, 0.2, 0.6], "topk", 2) == [0, 2]


def test_torch_and_list_scores_are_accepted() -> None:
    t = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.bfloat16)
    assert select(t, SelectionRule("topk", 2)).indices.tolist() == [1, 3]
    batch = select_batch(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1]]), SelectionRule("topk", 1))
    assert [s.indices.tolist() for s in batch] == [[1], [0]]


@pytest.mark.parametrize(
    "bad",
    [
        [[0.1, float("nan")]],
        [[0.1, float("inf")]],
        [[0.5, -0.1]],
        [[]],
        [[[0.1, 0.2]]],
    ],
)
def test_bad_scores_are_rejected(bad: list) -> None:
    with pytest.raises(ValueError):
        select_batch(np.array(bad, dtype=np.float64), SelectionRule("topk", 1))


def test_select_wants_one_row() -> None:
    with pytest.raises(ValueError):
        select(np.ones((2, 3)), SelectionRule("topk", 1))


@pytest.mark.parametrize(
    ("kind", "value", "min_patches"),
    [
        ("topK", 3, 1),
        ("topk", 0, 1),
        ("topk", 2.5, 1),
        ("topk", True, 1),
        ("random_k", -1, 1),
        ("topk", 2, 3),  # k below min_patches
        ("threshold", -0.1, 1),
        ("threshold", 1.5, 1),
        ("threshold", float("nan"), 1),
        ("sum_threshold", 0.0, 1),
        ("sum_threshold", 1.01, 1),
        ("sum_threshold", float("inf"), 1),
        ("sum_threshold", "half", 1),
        ("sum_threshold", None, 1),
        ("sum_threshold", 0.5, -1),
        ("sum_threshold", 0.5, 1.0),
    ],
)
def test_rule_validation(kind: str, value: object, min_patches: object) -> None:
    with pytest.raises(ConfigError):
        SelectionRule(kind, value, min_patches)  # type: ignore[arg-type]


def test_rule_normalises_k_and_is_frozen() -> None:
    rule = SelectionRule("topk", 4.0)
    assert rule.value == 4 and isinstance(rule.value, int) and rule.k == 4
    with pytest.raises(ConfigError):
        _ = SelectionRule("threshold", 0.1).k
    with pytest.raises(AttributeError):
        rule.value = 3  # type: ignore[misc]


def test_random_k_is_uniform_without_replacement_and_seeded() -> None:
    n, k, draws = 5, 2, 4000
    rng = np.random.default_rng(7)
    counts = np.zeros(n)
    scores = np.array([0.9, 0.05, 0.03, 0.01, 0.01])  # score-blind: must not favour patch 0
    for sel in select_batch(np.tile(scores, (draws, 1)), SelectionRule("random_k", k), rng=rng):
        assert sel.num_kept == k
        counts[sel.indices] += 1
    expected = draws * k / n  # 1600 per patch; binomial sd ≈ 31
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(draws * (k / n) * (1 - k / n)))
    a = select(scores, SelectionRule("random_k", 3), rng=np.random.default_rng(1))
    b = select(scores, SelectionRule("random_k", 3), rng=np.random.default_rng(1))
    assert a == b and a.num_kept == 3
    assert select(scores, SelectionRule("random_k", 9)).indices.tolist() == [0, 1, 2, 3, 4]


def test_selection_dataclass() -> None:
    sel = Selection(np.array([1, 3], dtype=np.int32), 12)
    assert sel.indices.dtype == np.int64 and not sel.indices.flags.writeable
    assert sel.fraction == pytest.approx(2 / 12) and len(sel) == 2
    assert sel.mask == bytes([0b01010000, 0b00000000])  # bits 1 and 3, MSB first
    assert Selection.from_mask(sel.mask, 12) == sel
    assert sel != Selection(np.array([1, 3]), 13)
    t = sel.index_tensor()
    assert t.dtype == torch.long and t.tolist() == [1, 3]
    for bad in ([3, 1], [1, 1], [-1, 2], [2, 12], [[1, 2]], [0.5]):
        with pytest.raises(ValueError):
            Selection(np.array(bad), 12)
    with pytest.raises(ValueError):
        Selection(np.array([], dtype=np.int64), 0)
    assert Selection(np.array([], dtype=np.int64), 4).fraction == 0.0


# ---------- properties ----------

scores_1d = arrays(np.float64, st.integers(1, 64),
                   elements=st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False))
rules = st.one_of(
    st.builds(SelectionRule, st.just("topk"), st.integers(1, 70), st.integers(0, 1)),
    st.builds(SelectionRule, st.just("threshold"), st.floats(0.0, 1.0), st.integers(0, 3)),
    st.builds(SelectionRule, st.just("sum_threshold"), st.floats(0.001, 1.0), st.integers(0, 3)),
    st.builds(SelectionRule, st.just("random_k"), st.integers(1, 70), st.integers(0, 1)),
)


def descending(s: np.ndarray) -> np.ndarray:
    """Reference order written independently: sort by (−score, index)."""
    return np.array(sorted(range(len(s)), key=lambda i: (-s[i], i)), dtype=np.int64)


@PROPS
@given(scores_1d, rules, st.integers(0, 2**32 - 1))
def test_selection_is_sorted_unique_in_range(s: np.ndarray, rule: SelectionRule, seed: int) -> None:
    sel = select(s, rule, rng=np.random.default_rng(seed))
    idx = sel.indices
    assert sel.num_patches == len(s)
    assert np.all(np.diff(idx) > 0)
    assert idx.size == 0 or (idx[0] >= 0 and idx[-1] < len(s))
    assert idx.size >= min(rule.min_patches, len(s))


@PROPS
@given(scores_1d, st.integers(1, 70))
def test_topk_keeps_exactly_k_best(s: np.ndarray, k: int) -> None:
    sel = select(s, SelectionRule("topk", k, min_patches=0))
    assert sel.num_kept == min(k, len(s))
    assert set(sel.indices.tolist()) == set(descending(s)[: min(k, len(s))].tolist())


@PROPS
@given(scores_1d, st.floats(0.0, 1.0), st.integers(0, 3))
def test_threshold_keeps_scores_at_or_above_delta(s: np.ndarray, delta: float, min_patches: int) -> None:
    sel = set(select(s, SelectionRule("threshold", delta, min_patches)).indices.tolist())
    above = {i for i in range(len(s)) if s[i] >= delta}
    if len(above) >= min_patches:
        assert sel == above
    else:
        assert sel == set(descending(s)[: min(min_patches, len(s))].tolist())


@PROPS
@given(scores_1d, st.floats(0.001, 1.0), st.integers(0, 3))
def test_sum_threshold_keeps_the_longest_prefix_within_delta(s: np.ndarray, delta: float,
                                                             min_patches: int) -> None:
    sel = select(s, SelectionRule("sum_threshold", delta, min_patches))
    order = descending(s)
    m = sel.num_kept
    assert set(sel.indices.tolist()) == set(order[:m].tolist())  # a prefix of the descending order
    total = float(np.sum(s))
    if total == 0.0:
        assert m == min(min_patches, len(s))
        return
    share = lambda j: float(np.sum(s[order[:j]])) / total  # noqa: E731
    if m > min(min_patches, len(s)):  # not degenerate: mass within δ_sum
        assert share(m) <= delta + 1e-9
    if m < len(s):  # maximal: one more patch would exceed δ_sum
        assert share(m + 1) > delta - SUM_TOLERANCE


@PROPS
@given(st.integers(1, 4), st.integers(1, 40), rules, st.integers(0, 1000))
def test_batch_equals_rows(b: int, n: int, rule: SelectionRule, seed: int) -> None:
    scores = np.random.default_rng(seed).random((b, n))
    if rule.kind == "random_k":
        batch = select_batch(scores, rule, rng=np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        rows = [select(scores[i], rule, rng=rng) for i in range(b)]
    else:
        batch = select_batch(scores, rule)
        rows = [select(scores[i], rule) for i in range(b)]
    assert batch == rows


@PROPS
@given(st.integers(1, 300).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=n))))
def test_mask_round_trip(case: tuple[int, set[int]]) -> None:
    n, kept_set = case
    data = pack_mask(sorted(kept_set), n)
    assert len(data) == mask_nbytes(n) == (n + 7) // 8
    assert unpack_mask(data, n).tolist() == sorted(kept_set)
    sel = Selection(np.array(sorted(kept_set), dtype=np.int64), n)
    assert Selection.from_mask(sel.mask, n) == sel


@PROPS
@given(st.integers(1, 300).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.integers(-n, n - 1), max_size=n))))
def test_mask_bits_are_numpys_packbits(case: tuple[int, list[int]]) -> None:
    """The wire layout (bit i, MSB first, is patch i) as numpy's packbits / unpackbits define it; packing
    takes what indexing an N-element array takes (negative indices from the end, duplicates)."""
    n, indices = case
    bits = np.zeros(n, dtype=np.uint8)
    bits[np.asarray(indices, dtype=np.int64)] = 1
    want = np.packbits(bits, bitorder="big").tobytes()
    assert pack_mask(indices, n) == pack_mask(np.asarray(indices, dtype=np.int32), n) == want
    kept = unpack_mask(want, n)
    assert kept.dtype == np.int64 and not kept.flags.writeable
    assert np.array_equal(kept, np.flatnonzero(bits))


@PROPS
@given(st.integers(1, 80).flatmap(lambda n: st.tuples(st.just(n), st.binary(max_size=(n + 7) // 8 + 1))))
def test_mask_keeps_any_is_unpack_mask_finding_a_patch(case: tuple[int, bytes]) -> None:
    """The validator's check without the unpack: true exactly when unpack_mask accepts the bytes and finds
    a patch kept; and a request's count of kept patches is the unpacked mask's size."""
    n, data = case
    try:
        kept = unpack_mask(data, n)
    except ValueError:
        assert not mask_keeps_any(data, n)
        return
    assert mask_keeps_any(data, n) is (kept.size > 0)
    assert int.from_bytes(data, "big").bit_count() == kept.size  # PatchRequest.kept


def test_mask_keeps_any_on_hand_made_masks() -> None:
    assert mask_keeps_any(b"\x80\x80", 9) and mask_keeps_any(b"\x00\x80", 9) and mask_keeps_any(b"\x01", 8)
    assert not mask_keeps_any(b"\x00\x00", 9)  # nothing kept
    assert not mask_keeps_any(b"\x00\x01", 9) and not mask_keeps_any(b"\x80\x40", 9)  # a padding bit set
    assert not mask_keeps_any(b"\x80", 9) and not mask_keeps_any(b"\x80\x00\x00", 9)  # wrong length


def test_pack_mask_refuses_indices_out_of_range() -> None:
    for bad in ([9], [-10], [0, 100]):
        with pytest.raises(IndexError):
            pack_mask(bad, 9)
    assert pack_mask([0, 8], 9) == b"\x80\x80" and pack_mask([-1], 9) == b"\x00\x80"


def test_unpack_mask_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        unpack_mask(b"\x00", 9)
    with pytest.raises(ValueError):
        unpack_mask(b"\x00\x01", 9)  # bit 15 set, past patch 8
    assert unpack_mask(b"\x80\x80", 9).tolist() == [0, 8]


def test_one_row_in_python_selects_what_the_numpy_path_selects() -> None:
    """A device's image (one float64 row) is selected in plain Python (``_select_row``, numpy's pairwise
    sum replayed); a batch of two takes the numpy path. Both must keep the same patches on rows with ties,
    zeros, all-zero rows, float32-rounded renormalised scores and lengths either side of numpy's summation
    blocks (8, 128)."""
    rng = np.random.default_rng(11)
    rules = [SelectionRule("topk", k) for k in (1, 5, 75, 300)] + \
            [SelectionRule("threshold", d) for d in (0.0, 0.01, 0.05)] + \
            [SelectionRule("sum_threshold", d) for d in (0.5, 0.9, 0.97, 1.0)] + \
            [SelectionRule("sum_threshold", 0.97, min_patches=0), SelectionRule("threshold", 0.5, min_patches=3)]
    for t in range(600):
        n = int(rng.choice([1, 7, 8, 9, 49, 64, 100, 128, 129, 196, 300]))
        x = rng.random(n) ** int(rng.integers(1, 10))
        if t % 7 == 0:
            x[rng.integers(0, n, size=max(1, n // 3))] = 0.0
        if t % 11 == 0:
            x = np.round(x, 2)  # ties
        if t % 13 == 0:
            x[:] = 0.0
        if t % 2 == 0 and x.sum() > 0:
            x = (x / x.sum()).astype(np.float32).astype(np.float64)
        for rule in rules:
            one = select_batch(x[None, :], rule)[0]
            two = select_batch(np.vstack([x, x]), rule)[0]
            assert np.array_equal(one.indices, two.indices), (n, rule)
            assert one.indices.dtype == np.int64 and not one.indices.flags.writeable


def test_pairwise_sum_is_numpys() -> None:
    from shared.selection import _pairwise_sum

    rng = np.random.default_rng(12)
    for n in [*range(1, 40), 127, 128, 129, 255, 256, 257, 1000]:
        x = rng.random(n) ** 3
        assert _pairwise_sum(x.tolist(), 0, n) == x.sum(), n


def test_one_row_in_python_at_the_exact_sum_threshold_boundary() -> None:
    """δ_sum placed so that the limit equals a cumulative share to the last bit: a total summed in another
    order (one ulp off) moves the cut. The Python row path must cut where numpy's does."""
    rng = np.random.default_rng(13)
    hits = 0
    for _ in range(400):
        n = int(rng.choice([64, 100, 196]))
        x = rng.random(n) ** int(rng.integers(1, 6))
        ordered = np.sort(x)[::-1]
        shares = np.cumsum(ordered) / ordered.sum()
        for i in rng.integers(0, n - 1, size=4):
            value = float(shares[i]) - SUM_TOLERANCE
            if not 0.0 < value <= 1.0 or value + SUM_TOLERANCE != shares[i]:
                continue
            hits += 1
            rule = SelectionRule("sum_threshold", value)
            one = select_batch(x[None, :], rule)[0]
            two = select_batch(np.vstack([x, x]), rule)[0]
            assert np.array_equal(one.indices, two.indices), (n, i)
    assert hits > 500


# --- the spread order -------------------------------------------------------------------------------

# A 4×4 grid in 2×2 cells: cell 0 = patches {0, 1, 4, 5}, cell 1 = {2, 3, 6, 7}, cell 2 = {8, 9, 12, 13},
# cell 3 = {10, 11, 14, 15}. The four best patches all lie in cell 0.
GRID = np.array([0.20, 0.15, 0.01, 0.02,
                 0.18, 0.16, 0.03, 0.04,
                 0.05, 0.06, 0.01, 0.02,
                 0.03, 0.01, 0.02, 0.01])


def test_spread_keeps_the_best_patch_of_every_cell_first() -> None:
    assert kept(GRID, "topk", 4) == [0, 1, 4, 5]  # by score: a cluster in cell 0
    # the best of each cell: 0 (0.20), 7 (0.04), 9 (0.06), and 11 of cell 3 (0.02, tied with 14: lower index)
    assert select(GRID, SelectionRule("topk", 4, spread=2)).indices.tolist() == [0, 7, 9, 11]
    # a fifth: the best second of any cell, 4 (0.18; then 8 at 0.05, 6 at 0.03, 14 at 0.02)
    assert select(GRID, SelectionRule("topk", 5, spread=2)).indices.tolist() == [0, 4, 7, 9, 11]


def test_spread_order_is_round_by_round_then_by_score() -> None:
    from shared.selection import spread_order

    order = spread_order(GRID[None], 2)[0].tolist()
    # round 1 by score: 0 (0.20, cell 0), 9 (0.06, cell 2), 7 (0.04, cell 1), 11 (0.02, cell 3)
    assert order[:4] == [0, 9, 7, 11]
    assert order[4:8] == [4, 8, 6, 14]  # round 2: 0.18, 0.05, 0.03, 0.02 (cell 3's second best)
    assert sorted(order) == list(range(16))


def test_spread_counts_as_the_rule_does() -> None:
    for kind, value in (("topk", 6), ("threshold", 0.05), ("sum_threshold", 0.8)):
        plain = select(GRID, SelectionRule(kind, value))  # type: ignore[arg-type]
        spread = select(GRID, SelectionRule(kind, value, spread=2))  # type: ignore[arg-type]
        assert spread.num_kept == plain.num_kept
        assert spread != plain  # the same count, other patches


def test_spread_one_and_zero_are_the_papers_order() -> None:
    for spread in (0, 1):
        assert select(GRID, SelectionRule("topk", 4, spread=spread)).indices.tolist() == [0, 1, 4, 5]


def test_spread_needs_a_square_grid() -> None:
    with pytest.raises(ValueError, match="square"):
        select(np.full(12, 1 / 12), SelectionRule("topk", 3, spread=2))


@pytest.mark.parametrize("spread", [-1, 2.0, True, "2"])
def test_spread_is_validated(spread: object) -> None:
    with pytest.raises(ConfigError, match="spread"):
        SelectionRule("topk", 3, spread=spread)  # type: ignore[arg-type]


@PROPS
@given(st.integers(2, 12), st.integers(2, 5), st.integers(0, 10_000))
def test_spread_order_properties(side: int, cell: int, seed: int) -> None:
    from shared.selection import spread_order

    n = side * side
    s = np.random.default_rng(seed).random((3, n))
    s[:, : n // 3] = s[:, : n // 3].round(1)  # some ties
    order = spread_order(s, cell)
    per_row = -(-side // cell)
    cell_of = lambda i: (i // side // cell) * per_row + (i % side) // cell  # noqa: E731
    for b in range(3):
        assert sorted(order[b].tolist()) == list(range(n))  # a permutation
        first = order[b, : per_row * per_row].tolist()
        assert sorted(cell_of(i) for i in first) == list(range(per_row * per_row))  # one per cell ...
        for i in first:  # ... its best (ties: the lower index)
            mates = [j for j in range(n) if cell_of(j) == cell_of(i)]
            assert i == min(mates, key=lambda j: (-s[b, j], j))
        # nested: a larger k keeps what a smaller one keeps
        small = select(s[b], SelectionRule("topk", max(1, n // 4), spread=cell))
        large = select(s[b], SelectionRule("topk", max(1, n // 2), spread=cell))
        assert set(small.indices.tolist()) <= set(large.indices.tolist())
    rule = SelectionRule("sum_threshold", 0.7, spread=cell)
    assert select_batch(s, rule) == [select(s[b], rule) for b in range(3)]
