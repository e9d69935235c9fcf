"""Numeric comparisons for the suite: every tolerance is relative to the size of what is compared.

A float32 result carries rounding noise in proportion to its own magnitude (about 6e-8 of it per
operation, more after sums, softmaxes and matmuls), so an absolute bound such as ``1e-5`` is loose
for a value of 0.01 and float noise for a value of 100 (a summed log-prob of -100 has a
float32 spacing of 7.6e-6). Every check here is instead

    |actual - expected| <= rtol * (|expected| + scale) + derived          (elementwise)

where ``scale`` says what "large" means for the quantity:

* tensors (logits, log-probs, gradients): by default the largest ``|expected|``, so an entry that
  happens to sit near zero is judged against the tensor's size, not its own;
* a value that should be zero because two equal quantities cancel (the KL of a policy against
  itself): the magnitude of the quantities that cancel, passed explicitly;
* a value computed from inputs that are themselves known only to a tolerance (a loss from
  log-probs): ``derived``, from :func:`first_order_bound`, carries the inputs' tolerance into the
  output through the function's own derivative. It is never a literal.

The same definition decides the negative controls: :func:`assert_differs` requires a wrong
computation to miss by ``factor`` times the tolerance the right one must meet, so loosening a
tolerance can never silently turn a negative control green.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch

#: Ratios land here as JSON lines when set (``TOLERANCE_REPORT=/tmp/t.jsonl pytest``): the headroom of
#: every comparison, for choosing tolerances from measurements rather than guesses.
REPORT_ENV = "TOLERANCE_REPORT"


def _as_tensor(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64) if not isinstance(value, torch.Tensor) else value.double()


def tolerance_ratio(actual, expected, *, rtol: float, scale: float | None = None, derived: float = 0.0) -> float:
    """max over elements of ``|actual - expected| / (rtol * (|expected| + scale) + derived)``.

    At most 1 means within tolerance; a negative control wants it far above 1. ``scale`` defaults
    to the largest ``|expected|`` (0 for a scalar, which makes the check purely relative).
    """
    a, e = _as_tensor(actual), _as_tensor(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    if scale is None:
        scale = float(e.abs().max()) if e.ndim else 0.0
    bound = rtol * (e.abs() + scale) + derived
    if not torch.isfinite(a).all() or not torch.isfinite(e).all():
        return float("inf") if not torch.equal(a, e) else 0.0
    diff = (a - e).abs()
    if float(bound.min()) == 0.0:  # a zero expected value with no scale: only exact equality passes
        return 0.0 if float(diff.max()) == 0.0 else float("inf")
    return float((diff / bound).max())


def _report(what: str, ratio: float, rtol: float) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "ratio": ratio, "rtol": rtol}) + "\n")


def assert_close(actual, expected, *, rtol: float, scale: float | None = None, derived: float = 0.0,
                 what: str = "") -> float:
    """Assert ``actual`` is within tolerance of ``expected`` (see the module docstring); returns the ratio."""
    ratio = tolerance_ratio(actual, expected, rtol=rtol, scale=scale, derived=derived)
    _report(what or "close", ratio, rtol)
    if ratio > 1.0:
        a, e = _as_tensor(actual), _as_tensor(expected)
        raise AssertionError(
            f"{what or 'values'} differ by {ratio:.3g}x the tolerance (rtol={rtol:g}, scale={scale}, "
            f"derived={derived:g}); "
            f"max |diff|={float((a - e).abs().max()):.4g}, max |expected|={float(e.abs().max()):.4g}")
    return ratio


def assert_differs(actual, expected, *, rtol: float, scale: float | None = None, derived: float = 0.0,
                   factor: float = 100.0, what: str = "") -> float:
    """A negative control: ``actual`` must miss ``expected`` by at least ``factor`` x the tolerance."""
    ratio = tolerance_ratio(actual, expected, rtol=rtol, scale=scale, derived=derived)
    _report(f"negative control: {what}" if what else "negative control", ratio, rtol)
    if ratio < factor:
        raise AssertionError(f"negative control {what!r} is only {ratio:.3g}x the tolerance (rtol={rtol:g}) away; "
                             f"it must be at least {factor:g}x, or the check cannot tell right from wrong")
    return ratio


def first_order_bound(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                      input_errors: Sequence[torch.Tensor]) -> float:
    """How far ``fn(*inputs)`` (a scalar) may move when each input moves by up to its error.

    The first-order bound ``sum_i |d fn / d x_i| * err_i``, from autograd in float64: the tolerance
    of a loss computed from log-probs that are themselves only known to a tolerance.
    """
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    total = 0.0
    for grad, err in zip(grads, input_errors):
        if grad is not None:
            total += float((grad.abs() * _as_tensor(err)).sum())
    return total


def logps_scale(metrics: dict, *, beta: float = 1.0, prefix: str = "", suffix: str = "") -> float:
    """``beta * (|logps/chosen| + |logps/rejected|)`` of a metrics row (TRL's names).

    The size of the log-probs that cancel in a margin, an implicit reward or a KL: the ``scale``
    for those quantities, which sit at 0 whenever policy and reference agree.
    """
    return beta * (abs(metrics[f"{prefix}logps/chosen{suffix}"]) + abs(metrics[f"{prefix}logps/rejected{suffix}"]))
