"""The policy a run trains: its ModelConfig from the run config, parameters initialised or loaded
straight into their shardings, and the abstract train state that tools restore checkpoints into."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax import optim, sharding
from gspo_jax.models.config import PRESETS, ModelConfig
from gspo_jax.models.hf import abstract_model, from_pretrained
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.update import TrainState


@dataclasses.dataclass
class Policy:
    """The model split for jit: graphdef (static) + params (sharded State), and its config."""

    config: ModelConfig
    graphdef: Any
    params: nnx.State


def runtime_settings(cfg) -> dict:
    """The ModelConfig runtime fields set by the run config's model section."""
    return dict(
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        moe_dispatch=cfg.model.moe_dispatch,
        capacity_factor=cfg.model.capacity_factor,
        # configs saved by older versions lack the later keys
        remat=cfg.model.get("remat", False),
        expert_parallel=cfg.model.get("expert_parallel", "auto"),
        remat_policy=cfg.model.get("remat_policy", "nothing_saveable"),
        scan_unroll=cfg.model.get("scan_unroll", 1),
        attention_chunk=cfg.model.get("attention_chunk", 128),
        decode_layers=cfg.model.get("decode_layers", "auto"),
    )


def model_config(cfg) -> ModelConfig:
    if cfg.model.hf_path:
        return ModelConfig.from_hf_path(cfg.model.hf_path, **runtime_settings(cfg))
    return PRESETS[cfg.model.preset].replace(**runtime_settings(cfg))


def build_policy(cfg, mesh) -> Policy:
    """Loads hf_path or initialises the preset, with every parameter placed by its logical axes."""
    mcfg = model_config(cfg)
    graphdef, abstract = abstract_model(mcfg)
    shardings = sharding.param_shardings(abstract, mesh, cfg.mesh.rules.to_dict())
    if cfg.model.hf_path:
        flat = {path: s.get_value() for path, s in nnx.to_flat_state(shardings)}
        runtime = runtime_settings(cfg)
        model = from_pretrained(cfg.model.hf_path, runtime.pop("dtype"), shardings=flat, **runtime)
        _, params = nnx.split(model)
    else:
        params = init_params(mcfg, shardings, cfg.seed)
    return Policy(mcfg, graphdef, params)


def init_params(mcfg: ModelConfig, shardings: nnx.State, seed: int) -> nnx.State:
    """A fresh random initialisation, each parameter created directly in its sharding."""

    def init(key):
        return nnx.split(QwenMoeForCausalLM(mcfg, rngs=nnx.Rngs(params=key)))[1]

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def total_updates(cfg) -> int:
    return cfg.steps * cfg.algo.minibatches * cfg.algo.iterations


def train_state_shardings(optimizer, params) -> TrainState:
    """A TrainState of NamedShardings: parameters as placed, each optimizer moment like its parameter,
    counters replicated. params: arrays or ShapeDtypeStructs with shardings; allocates nothing."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return TrainState(
        params=sharding.shardings_of(params),
        opt_state=optim.state_shardings(optimizer, params),
        step=sharding.replicated(mesh),
    )


def init_train_state(optimizer, params) -> TrainState:
    """The state of a fresh run around placed `params`: moments and counters are created directly in
    `train_state_shardings` (never placed on one device first), so the jitted phases see the same
    shardings on every call."""
    shardings = train_state_shardings(optimizer, params)
    fresh = jax.jit(_fresh_optimizer_state(optimizer), out_shardings=(shardings.opt_state, shardings.step))
    opt_state, step = fresh(params)
    return TrainState(params=params, opt_state=opt_state, step=step)


def _fresh_optimizer_state(optimizer):
    """params -> (optimizer state, update counter) of a run that has not updated yet."""
    return lambda params: (optimizer.init(params), jnp.zeros((), jnp.int32))


def abstract_train_state(cfg, mesh):
    """({"train": TrainState, "rng": key[, "ref": params]} of ShapeDtypeStructs with shardings, graphdef); allocates nothing.

    The restore target for tools that only read a run's checkpoint (export); laid out exactly like
    `init_train_state`."""
    graphdef, abstract = abstract_model(model_config(cfg))
    shardings = sharding.param_shardings(abstract, mesh, cfg.mesh.rules.to_dict())
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    optimizer = optim.make_optimizer(cfg.optim, total_updates(cfg))
    opt_state, step = jax.eval_shape(_fresh_optimizer_state(optimizer), params)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(params=params, opt_state=opt_state, step=step),
        train_state_shardings(optimizer, params),
    )
    rng = jax.eval_shape(lambda: jax.random.key(0))
    tree = {"train": state, "rng": rng}
    if cfg.algo.beta > 0:
        tree["ref"] = params  # the KL reference (the policy RL started from)
    return tree, graphdef
