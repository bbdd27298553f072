"""The learning-rate schedules against their closed forms, and optim's config errors."""

import math

import ml_collections
import pytest

from gspo_jax.optim import config_errors, learning_rate_schedule


def _optim(schedule, **kw):
    return ml_collections.ConfigDict(
        {"lr": 1e-3, "warmup_steps": 4, "schedule": schedule, "final_lr_fraction": 0.1, "grad_clip": 1.0} | kw
    )


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_schedules_match_closed_forms(schedule):
    total, warmup, lr = 24, 4, 1e-3
    fn = learning_rate_schedule(_optim(schedule), total)
    for step in range(total):
        if step < warmup:
            expected = lr / warmup + (lr - lr / warmup) * step / (warmup - 1)
        elif schedule == "constant":
            expected = lr
        else:
            progress = (step - warmup) / (total - warmup)
            expected = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert float(fn(step)) == pytest.approx(expected, rel=1e-5), step


def test_optim_config_errors_name_the_key():
    errors = config_errors(_optim("linear", lr=0.0, grad_clip=0.0))
    assert any(e.startswith("--config.optim.schedule: 'linear': use one of ['constant', 'cosine']") for e in errors)
    assert any(e.startswith("--config.optim.lr") for e in errors)
    assert any(e.startswith("--config.optim.grad_clip") for e in errors)
    assert config_errors(_optim("cosine")) == []
