"""The optax optimizer of a training phase: global-norm clipping, then AdamW on a warmup + decay schedule."""

from __future__ import annotations

import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim_cfg, total_updates: int) -> optax.Schedule:
    """Linear warmup over `warmup_steps` updates, then constant or cosine decay to lr * final_lr_fraction."""
    lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    if optim_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif optim_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            lr, max(total_updates - warmup, 1), alpha=optim_cfg.final_lr_fraction
        )
    else:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: use one of {SCHEDULES}")
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
