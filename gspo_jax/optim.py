"""The optax optimizer of a training phase: global-norm clipping, then AdamW on a warmup + decay schedule."""

from __future__ import annotations

from typing import Any, Callable

import optax

# What follows the warmup, by `optim.schedule`: (optim_cfg, updates after warmup) -> schedule.
SCHEDULES: dict[str, Callable[[Any, int], optax.Schedule]] = {
    "constant": lambda c, n: optax.constant_schedule(float(c.lr)),
    "cosine": lambda c, n: optax.cosine_decay_schedule(float(c.lr), max(n, 1), alpha=c.final_lr_fraction),
}


def config_errors(optim_cfg) -> list[str]:
    """Problems with the `optim.*` keys."""
    errors = []
    if optim_cfg.lr <= 0:
        errors.append(f"--config.optim.lr: must be > 0, got {optim_cfg.lr}")
    if optim_cfg.schedule not in SCHEDULES:
        errors.append(f"--config.optim.schedule: {optim_cfg.schedule!r}: use one of {sorted(SCHEDULES)}")
    if optim_cfg.grad_clip <= 0:
        errors.append("--config.optim.grad_clip: must be > 0")
    return errors


def learning_rate_schedule(optim_cfg, total_updates: int) -> optax.Schedule:
    """Linear warmup over `warmup_steps` updates, then constant or cosine decay to lr * final_lr_fraction."""
    lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    if optim_cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: use one of {sorted(SCHEDULES)}")
    after = SCHEDULES[optim_cfg.schedule](optim_cfg, total_updates - warmup)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(lr / warmup, lr, warmup - 1), after], [warmup])


def make_optimizer(optim_cfg, total_updates: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(float(optim_cfg.grad_clip)),
        optax.adamw(
            learning_rate_schedule(optim_cfg, total_updates),
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
        ),
    )
