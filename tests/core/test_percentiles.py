"""shared.percentiles: the one percentile helper (linear interpolation between closest ranks)."""

from __future__ import annotations

import pytest

from shared.percentiles import percentile, percentiles


def test_linear_interpolation_between_ranks_in_any_order() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    # ranks 0..3: p50 sits halfway between 2 and 3, p90 at 0.7 of the way from 3 to 4
    assert percentiles(values, (0, 50, 90, 100)) == pytest.approx([1.0, 2.5, 3.7, 4.0])
    assert percentile([7.0], 99) == 7.0
    assert percentile(iter([10.0, 20.0]), 25) == pytest.approx(12.5)  # any iterable


def test_no_values_is_no_percentile_and_bad_quantiles_are_refused() -> None:
    assert percentiles([], (50, 95)) is None and percentile([], 50) is None
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentiles([1.0], (0.95, 195))
