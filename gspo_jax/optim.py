"""The optax optimizer of a training phase (global-norm clipping, then AdamW on a warmup + decay schedule),
and its state created directly in the shardings of the parameters it updates."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

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


def state_shardings(optimizer: optax.GradientTransformation, params):
    """Shardings of `optimizer.init(params)`: every per-parameter moment laid out like its parameter,
    everything else (step counters, empty states) replicated on the parameters' mesh.

    params: arrays or ShapeDtypeStructs, each with a NamedSharding on one mesh; allocates nothing."""
    leaves = jax.tree.leaves(params)
    meshes = {getattr(p.sharding, "mesh", None) for p in leaves}
    if len(meshes) != 1 or None in meshes:
        raise ValueError(
            "optimizer state shardings need every parameter placed with a NamedSharding on one mesh "
            "(build the parameters with policy.build_policy or sharding.param_shardings)"
        )
    replicated = NamedSharding(meshes.pop(), PartitionSpec())
    abstract = jax.eval_shape(optimizer.init, params)

    def like_param(moment, param):
        if moment.shape != param.shape:
            raise ValueError(f"optimizer moment of shape {moment.shape} for a parameter of {param.shape}")
        return param.sharding

    return optax.tree_map_params(
        optimizer,
        like_param,
        abstract,
        params,
        transform_non_params=lambda subtree: jax.tree.map(lambda _: replicated, subtree),
    )


def init_state(optimizer: optax.GradientTransformation, params):
    """optimizer.init(params), created directly in `state_shardings` (nothing is placed, then moved)."""
    return jax.jit(optimizer.init, out_shardings=state_shardings(optimizer, params))(params)
