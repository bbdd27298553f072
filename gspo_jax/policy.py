"""The policy a run trains: its ModelConfig from the run config, parameters initialised or loaded
straight into their shardings, and the abstract train state that tools restore checkpoints into."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax import sharding
from gspo_jax.models.config import PRESETS, ModelConfig
from gspo_jax.models.hf import abstract_model, from_pretrained
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.optim import make_optimizer
from gspo_jax.update import TrainState


@dataclasses.dataclass
class Policy:
    """The model split for jit: graphdef (static) + params (sharded State), and its config."""

    config: ModelConfig
    graphdef: Any
    params: nnx.State


def model_config(cfg) -> ModelConfig:
    runtime = dict(
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        moe_dispatch=cfg.model.moe_dispatch,
        capacity_factor=cfg.model.capacity_factor,
        remat=cfg.model.get("remat", False),  # configs saved before remat existed lack it
        remat_policy=cfg.model.get("remat_policy", "nothing_saveable"),
    )
    if cfg.model.hf_path:
        return ModelConfig.from_hf_path(cfg.model.hf_path, **runtime)
    return PRESETS[cfg.model.preset].replace(**runtime)


def build_policy(cfg, mesh) -> Policy:
    """Loads hf_path or initialises the preset, with every parameter placed by its logical axes."""
    mcfg = model_config(cfg)
    graphdef, abstract = abstract_model(mcfg)
    shardings = sharding.param_shardings(abstract, mesh, cfg.mesh.rules.to_dict())
    if cfg.model.hf_path:
        flat = {path: s.get_value() for path, s in nnx.to_flat_state(shardings)}
        model = from_pretrained(
            cfg.model.hf_path,
            cfg.model.dtype,
            param_dtype=cfg.model.param_dtype,
            shardings=flat,
            moe_dispatch=cfg.model.moe_dispatch,
            capacity_factor=cfg.model.capacity_factor,
            remat=cfg.model.get("remat", False),
            remat_policy=cfg.model.get("remat_policy", "nothing_saveable"),
        )
        _, params = nnx.split(model)
    else:

        def init(key):
            return nnx.split(QwenMoeForCausalLM(mcfg, rngs=nnx.Rngs(params=key)))[1]

        params = jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed))
    return Policy(mcfg, graphdef, params)


def total_updates(cfg) -> int:
    return cfg.steps * cfg.algo.minibatches * cfg.algo.iterations


def abstract_train_state(cfg, mesh):
    """({"train": TrainState, "rng": key} of ShapeDtypeStructs with shardings, graphdef); allocates nothing.

    The restore target for tools that only read a run's checkpoint (export)."""
    graphdef, abstract = abstract_model(model_config(cfg))
    shardings = sharding.param_shardings(abstract, mesh, cfg.mesh.rules.to_dict())
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    init = jax.jit(make_optimizer(cfg.optim, total_updates(cfg)).init)
    opt_shardings = init.lower(params).compile().output_shardings
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(init, params),
        opt_shardings,
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
    rng = jax.eval_shape(lambda: jax.random.key(0))
    return {"train": TrainState(params=params, opt_state=opt_state, step=step), "rng": rng}, graphdef
