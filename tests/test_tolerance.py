"""The suite's comparison helper: relative tolerances, derived bounds and negative controls."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tolerance import (
    assert_close,
    assert_differs,
    first_order_bound,
    tolerance_ratio,
)


def test_scalars_are_compared_relative_to_their_size():
    # the failure issue 10 reported: 3.6533091 vs 3.6533248 is 4.3e-6 of the value
    assert tolerance_ratio(3.6533091, 3.6533248, rtol=1e-5) == pytest.approx(0.43, rel=1e-2)
    assert tolerance_ratio(-100.0 + 1.5e-5, -100.0, rtol=1e-6) == pytest.approx(0.15, rel=1e-6)
    # the same absolute error is far outside the tolerance for a value near 1e-3
    assert tolerance_ratio(1e-3 + 1.5e-5, 1e-3, rtol=1e-6) > 1000


def test_tensor_scale_defaults_to_the_largest_expected_value():
    expected = torch.tensor([10.0, 1e-9])
    near_zero_off = torch.tensor([10.0, 5e-5])  # 5e-5 against a tensor of size 10: 0.5x rtol=1e-5
    assert tolerance_ratio(near_zero_off, expected, rtol=1e-5) == pytest.approx(0.5, rel=1e-3)
    assert tolerance_ratio(near_zero_off, expected, rtol=1e-5, scale=0.0) > 1e4  # judged on its own size


def test_zero_expected_needs_a_scale_or_equality():
    assert tolerance_ratio(0.0, 0.0, rtol=1e-6) == 0.0
    assert math.isinf(tolerance_ratio(1e-30, 0.0, rtol=1e-6))
    assert tolerance_ratio(5e-5, 0.0, rtol=1e-6, scale=100.0) == pytest.approx(0.5)


def test_non_finite_values_never_pass_unless_identical():
    assert math.isinf(tolerance_ratio(float("nan"), 1.0, rtol=1.0))
    assert tolerance_ratio(torch.tensor([float("inf")]), torch.tensor([float("inf")]), rtol=1e-6) == 0.0


def test_assert_close_and_assert_differs_share_one_definition():
    assert assert_close(1.0 + 5e-7, 1.0, rtol=1e-6) <= 1.0
    with pytest.raises(AssertionError, match=r"differ by 2x the tolerance"):
        assert_close(1.0 + 2e-6, 1.0, rtol=1e-6, what="values")
    assert assert_differs(1.5, 1.0, rtol=1e-6) >= 100
    # a miss of only 50x the tolerance is not a negative control that can tell right from wrong
    with pytest.raises(AssertionError, match="negative control"):
        assert_differs(1.0 + 5e-5, 1.0, rtol=1e-6)
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close(torch.zeros(2), torch.zeros(3), rtol=1e-6)


def test_first_order_bound_is_the_derivative_times_the_input_error():
    x, y = torch.tensor([1.0, -2.0]), torch.tensor([3.0])
    err_x, err_y = torch.tensor([0.1, 0.2]), torch.tensor([0.01])
    # f = sum(x^2) * y: |df/dx| = |2 x y| = [6, 12], |df/dy| = sum(x^2) = 5
    bound = first_order_bound(lambda a, b: (a ** 2).sum() * b.sum(), [x, y], [err_x, err_y])
    assert bound == pytest.approx(6 * 0.1 + 12 * 0.2 + 5 * 0.01)
    # and an actual move within the errors stays within the bound (to first order)
    moved = ((x + err_x * torch.sign(x)) ** 2).sum() * (y + err_y)
    assert abs(float(moved - (x ** 2).sum() * y)) <= bound * 1.1
