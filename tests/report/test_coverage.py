"""The calibration of the interval's degrees of freedom (dpcam.report.coverage): exact error rates."""

import pytest

from dpcam.report import coverage


def test_satterthwaite_alone_under_covers_with_three_seeds():
    """The defect the calibration removes: ν from the same noisy seed variance, 3 seeds, seed share 0.9."""
    assert coverage.error_rate(0.9, k=2, c=1.0, alpha=0.05) > 0.075  # coverage below 92.5 %
    assert coverage.error_rate(0.9, k=2, c=coverage.inflation(2, 0.05), alpha=0.05) <= 0.05


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("alpha", [0.05, 0.005])
def test_the_tables_interval_errs_at_most_alpha_at_every_seed_share_and_not_much_less(k, alpha):
    c = coverage.inflation(k, alpha)
    errors = [coverage.error_rate(w, k, c, alpha) for w in coverage.SHARES]
    assert max(errors) <= alpha * 1.002  # covers at least 1 − α wherever the seed share lies
    assert max(errors) >= alpha * 0.98  # and c is the smallest such value: no wider than needed
    # in the limits the interval is exact: all seed (Student t on k df) or all image (normal)
    assert coverage.error_rate(0.9999, k, c, alpha) == pytest.approx(alpha, rel=0.02)
    assert coverage.error_rate(0.0001, k, c, alpha) == pytest.approx(alpha, rel=0.02)


def test_the_table_is_what_calibrate_computes():
    assert coverage.calibrate(2, 0.05) == pytest.approx(coverage.INFLATION[2][coverage.ALPHAS.index(0.05)], rel=0.01)


def test_more_seeds_need_less_inflation_and_the_tails_more():
    assert coverage.inflation(4, 0.05) < coverage.inflation(2, 0.05) < coverage.inflation(2, 0.001)
    assert coverage.inflation(50, 0.05) == coverage.inflation(9, 0.05)  # beyond the table: its last row
    with pytest.raises(ValueError):
        coverage.inflation(0, 0.05)
