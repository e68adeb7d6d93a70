"""Mean and Student-t CI over seeds, checked against hand-computed numbers."""

import math

import numpy as np
import pytest

from dpcam import report as rep
from tests.report.fakes import T_975_1


def test_mean_ci_matches_student_t_by_hand():
    mean, half = rep.mean_ci([0.5, 0.7])
    s = math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1)  # ddof = 1
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(T_975_1 * s / math.sqrt(2)) and half == pytest.approx(1.2706, abs=1e-4)
    # three seeds: t_{0.975,2} = 4.302653
    mean, half = rep.mean_ci([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(4.302653 * np.std([1, 2, 4], ddof=1) / math.sqrt(3), rel=1e-6)
    assert rep.mean_ci([0.3]) == (0.3, None)
    assert rep.mean_ci([]) == (None, None)
    assert rep.format_cell([0.5, 0.7], 3) == "0.600 ± 1.271"
    assert rep.format_cell([0.5], 3) == "0.500"
    assert rep.format_cell([], 3) == "—"
