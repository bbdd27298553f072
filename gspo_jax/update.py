"""The jitted phases of one RL step on the trainer side: scoring completions and the minibatch updates.

A rollout batch holds B = N*G sequences laid out as [left-padded prompt (P) | completion (N_new)].
`score` computes per-token log-probs of the completions (old policy or reference); `train` runs
`iterations` passes of `minibatches` AdamW updates of the policy loss in one compiled lax.scan, so one
RL step costs one dispatch per phase and no host round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gspo_jax import losses
from gspo_jax.logprobs import token_logprobs_from_hidden
from gspo_jax.models.moe import load_balancing_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutBatch:
    """tokens/valid: [B, P + N]; completion_mask, old_logp, sampler_logp, ref_logp: [B, N];
    advantages: [B] (one per sequence)."""

    tokens: jax.Array
    valid: jax.Array
    completion_mask: jax.Array
    advantages: jax.Array
    old_logp: jax.Array
    sampler_logp: jax.Array
    ref_logp: jax.Array

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything an RL step changes: policy parameters, optimizer state, update counter."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Static settings of the policy update (hashable: part of the compiled function's identity)."""

    level: str
    eps_low: float | None
    eps_high: float | None
    aggregation: str
    beta: float
    aux_loss_coef: float
    temperature: float
    logprob_chunk: int
    minibatches: int
    iterations: int


def completion_logprobs(
    model,
    tokens_bl,
    valid_bl,
    completion_len: int,
    *,
    temperature: float,
    chunk: int,
    with_entropy: bool = False,
):
    """log pi(y_t | x, y_<t) of the last `completion_len` tokens of each row: ([B, N], entropy, stats).

    The hidden state at position l predicts token l + 1, so the forward runs over tokens[:, :-1] and
    keeps its last `completion_len` positions. Log-probs use the temperature-scaled distribution the
    sampler drew from, so old and new policies are compared on the same distribution.
    """
    out = model.forward(tokens_bl[:, :-1], valid_bt=valid_bl[:, :-1])
    hidden = out.hidden[:, -completion_len:]
    targets = tokens_bl[:, -completion_len:]
    result = token_logprobs_from_hidden(
        hidden,
        model.lm_head_weight(),
        targets,
        temperature=temperature,
        chunk_size=chunk,
        with_entropy=with_entropy,
    )
    logp, entropy = result if with_entropy else (result, None)
    return logp, entropy, out.router_stats


def _minibatches(tree, num: int):
    """[B, ...] leaves -> [num, B / num, ...]."""
    return jax.tree.map(lambda x: x.reshape(num, x.shape[0] // num, *x.shape[1:]), tree)


def make_score_fn(graphdef, settings: UpdateSettings) -> Callable:
    """jit(params, tokens, valid, completion_mask) -> log-probs [B, N], in minibatch-sized chunks."""

    def score(params, tokens, valid, completion_mask):
        model = nnx.merge(graphdef, params)

        def one(chunk):
            t, v = chunk
            logp, _, _ = completion_logprobs(
                model,
                t,
                v,
                completion_mask.shape[1],
                temperature=settings.temperature,
                chunk=settings.logprob_chunk,
            )
            return logp

        logp = jax.lax.map(one, _minibatches((tokens, valid), settings.minibatches))
        return logp.reshape(completion_mask.shape) * completion_mask

    return jax.jit(score)


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_fn(graphdef, optimizer: optax.GradientTransformation, settings: UpdateSettings) -> Callable:
    """jit(state, batch, key) -> (state, metrics [iterations, minibatches]); the state is donated."""

    def loss_fn(params, mb: RolloutBatch):
        model = nnx.merge(graphdef, params)
        logp, entropy, stats = completion_logprobs(
            model,
            mb.tokens,
            mb.valid,
            mb.completion_len,
            temperature=settings.temperature,
            chunk=settings.logprob_chunk,
            with_entropy=True,
        )
        mask = mb.completion_mask
        loss, metrics = losses.policy_loss(
            logp,
            mb.old_logp,
            mb.advantages,
            mask,
            level=settings.level,
            eps_low=settings.eps_low,
            eps_high=settings.eps_high,
            aggregation=settings.aggregation,
            ref_logp=mb.ref_logp if settings.beta > 0 else None,
            beta=settings.beta,
        )
        aux = load_balancing_loss(stats)
        metrics = dict(metrics)
        metrics["moe/aux_loss"] = aux
        metrics["entropy"] = _masked_mean(entropy, mask)
        metrics["logprob_gap/token_abs"] = _masked_mean(jnp.abs(logp - mb.sampler_logp), mask)
        if stats is not None:
            counts = stats.expert_counts  # [MoE layers, E]
            metrics["moe/expert_load"] = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
            metrics["moe/dropped_frac"] = jnp.sum(stats.dropped) / jnp.maximum(jnp.sum(counts), 1.0)
        return loss + settings.aux_loss_coef * aux, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state: TrainState, mb: RolloutBatch):
        (total, metrics), grads = grad_fn(state.params, mb)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            step=state.step + finite.astype(state.step.dtype),
        )
        metrics |= {"loss": total, "grad_norm": grad_norm, "update_skipped": (~finite).astype(jnp.float32)}
        return new_state, metrics

    def train(state: TrainState, batch: RolloutBatch, key):
        def one_pass(state, pass_key):
            order = jax.random.permutation(pass_key, batch.tokens.shape[0])
            shuffled = jax.tree.map(lambda x: x[order], batch)
            return jax.lax.scan(update, state, _minibatches(shuffled, settings.minibatches))

        return jax.lax.scan(one_pass, state, jax.random.split(key, settings.iterations))

    return jax.jit(train, donate_argnums=(0,))
