"""The GSPO train step lowered on abstract inputs (nothing allocated): what XLA is asked to compile
for a model config and batch shape. Used by the compile-time benchmark and the program-size tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gspo_jax.models.config import ModelConfig
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.update import RolloutBatch, TrainState, UpdateSettings, make_train_fn


def lower_train_step(
    model_cfg: ModelConfig,
    *,
    rows: int = 8,
    prompt_len: int = 16,
    completion_len: int = 16,
    minibatches: int = 2,
) -> jax.stages.Lowered:
    """update.make_train_fn (GSPO sequence level, AdamW) lowered for `rows` sequences of
    prompt_len + completion_len tokens split into `minibatches` updates."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: QwenMoeForCausalLM(model_cfg, rngs=nnx.Rngs(0))))
    optimizer = optax.adamw(1e-4)
    state = TrainState(
        params=params,
        opt_state=jax.eval_shape(optimizer.init, params),
        step=jax.ShapeDtypeStruct((), jnp.int32),
    )
    seq = lambda width, dtype: jax.ShapeDtypeStruct((rows, width), dtype)
    batch = RolloutBatch(
        tokens=seq(prompt_len + completion_len, jnp.int32),
        valid=seq(prompt_len + completion_len, jnp.bool_),
        completion_mask=seq(completion_len, jnp.float32),
        advantages=jax.ShapeDtypeStruct((rows,), jnp.float32),
        old_logp=seq(completion_len, jnp.float32),
        sampler_logp=seq(completion_len, jnp.float32),
        ref_logp=seq(completion_len, jnp.float32),
    )
    settings = UpdateSettings(
        level="sequence",
        eps_low=3e-4,
        eps_high=4e-4,
        aggregation="seq-mean-token-mean",
        beta=0.0,
        aux_loss_coef=model_cfg.router_aux_loss_coef,
        temperature=1.0,
        logprob_chunk=completion_len,
        minibatches=minibatches,
        iterations=1,
    )
    key = jax.eval_shape(lambda: jax.random.key(0))
    return make_train_fn(graphdef, optimizer, settings).lower(state, batch, key)
