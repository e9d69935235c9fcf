"""The LR schedule (pure)."""

from __future__ import annotations

import pytest

from dpo_rl.optim import lr_factor


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert [lr_factor(s, warmup=4, total=10, style="constant", min_ratio=0.1) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    assert lr_factor(4, warmup=4, total=10, style="linear", min_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(10, warmup=4, total=10, style="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, warmup=4, total=10, style="cosine", min_ratio=0.0) == pytest.approx(0.5)


def test_unknown_decay_style_is_an_error():
    with pytest.raises(ValueError, match="unknown lr_decay_style"):
        lr_factor(5, warmup=0, total=10, style="exponential", min_ratio=0.0)
