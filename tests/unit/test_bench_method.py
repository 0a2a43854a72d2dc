"""The benches' shared method: alternating pairs, lengthened until one pair varies little."""

from __future__ import annotations

import pytest

from bench.common import ratio_figures, steady_pairs, variation


def test_ratio_figures_report_median_spread_and_variation() -> None:
    figures = ratio_figures("x_ratio", [0.8, 1.0, 1.2, 0.9, 1.1])
    assert figures == {"x_ratio": 1.0, "x_ratio_min": 0.8, "x_ratio_max": 1.2,
                       "x_ratio_variation": 0.1, "x_ratio_pairs": 5}


async def test_noisy_pairs_are_measured_again_with_longer_runs() -> None:
    seen: list[float] = []

    async def pair(scale: float) -> tuple[float, float]:
        seen.append(scale)
        # Noise that shrinks as runs grow, as averaging over longer runs does.
        noise = 0.36 / scale if len(seen) % 2 else -0.36 / scale
        return 100.0, 50.0 * (1 + noise)

    found = await steady_pairs(pair, pairs=4, budget_s=3600)
    assert found.scale == 4.0  # 0.36 and 0.18 vary too much; 0.09 does not
    assert seen == [1.0] * 4 + [2.0] * 4 + [4.0] * 4
    assert variation(found.ratios) == pytest.approx(0.09)
    assert found.baseline == [100.0] * 4


async def test_steady_pairs_stop_at_the_budget_and_the_largest_scale() -> None:
    calls = 0

    async def noisy(scale: float) -> tuple[float, float]:
        nonlocal calls
        calls += 1
        return 1.0, 1.0 + calls % 2  # never steady

    capped = await steady_pairs(noisy, pairs=2, budget_s=3600, max_scale=4)
    assert capped.scale == 4.0
    quick = await steady_pairs(noisy, pairs=2, budget_s=0)
    assert quick.scale == 1.0 and len(quick.ratios) == 2
