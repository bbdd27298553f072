"""The jitted phases of one RL step (rl_step.py calls them): scoring completions and the minibatch updates.

A rollout batch holds B = N*G sequences laid out as [left-padded prompt (P) | completion (C)], T = P + C
(shape letters: BUILD_NOTES.md, "Shapes").
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
from jax.sharding import NamedSharding, PartitionSpec

from gspo_jax import diagnostics, losses, packing
from gspo_jax.logprobs import completion_logprobs, packed_completion_logprobs
from gspo_jax.models.moe import load_balancing_loss
from gspo_jax.sharding import BATCH_AXES


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutBatch:
    """tokens/valid: [B, T]; completion_mask, old_logp, sampler_logp, ref_logp: [B, C];
    advantages: [B] (one per sequence); expert_ids: [B, L_moe, T - 1, k] int32, the old policy's
    expert choices over tokens[:, :-1] (routing replay), or None; packing: the step's sequence-packing
    plan (packing.PackedRows: the update's passes, minibatches and packed rows), or None to train on
    the [B, T] rows as they are, shuffled on the device."""

    tokens: jax.Array
    valid: jax.Array
    completion_mask: jax.Array
    advantages: jax.Array
    old_logp: jax.Array
    sampler_logp: jax.Array
    ref_logp: jax.Array
    expert_ids: jax.Array | None = None
    packing: packing.PackedRows | None = None

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
    routing_replay: bool = False
    routing_volatility: bool = False
    ratio_length_edges: tuple[int, ...] = ()  # upper edges of the ratio-by-length bins; () = off

    @classmethod
    def from_config(cls, cfg, router_aux_loss_coef: float) -> UpdateSettings:
        """From the run config; model.aux_loss_coef None takes the model's own router_aux_loss_coef."""
        aux_coef = cfg.model.aux_loss_coef
        return cls(
            level=cfg.algo.importance_sampling_level,
            eps_low=cfg.algo.eps_low,
            eps_high=cfg.algo.eps_high,
            aggregation=cfg.algo.aggregation,
            beta=cfg.algo.beta,
            aux_loss_coef=router_aux_loss_coef if aux_coef is None else aux_coef,
            temperature=cfg.rollout.temperature or 1.0,
            logprob_chunk=cfg.model.logprob_chunk,
            minibatches=cfg.algo.minibatches,
            iterations=cfg.algo.iterations,
            routing_replay=cfg.algo.routing_replay,
            routing_volatility=cfg.log.routing_volatility,
            ratio_length_edges=(
                diagnostics.length_bin_edges(cfg.rollout.max_new_tokens) if cfg.log.ratio_by_length else ()
            ),
        )


def _minibatches(tree, num: int):
    """[B, ...] leaves -> [num, B / num, ...]."""
    return jax.tree.map(lambda x: x.reshape(num, x.shape[0] // num, *x.shape[1:]), tree)


def make_score_fn(graphdef, settings: UpdateSettings, with_expert_ids: bool = False) -> Callable:
    """jit(params, tokens, valid, completion_mask, plan=None) -> log-probs [B, C], in minibatch-sized
    chunks; with a packing plan (packing.PackedRows of one pass, its minibatches the chunks) the
    forward runs on packed rows. with_expert_ids: (log-probs, expert ids [B, L_moe, T - 1, k] the
    forward routed with), which routing replay reuses (the forward computes them anyway; unpacked)."""

    def score(params, tokens, valid, completion_mask, plan=None):
        model = nnx.merge(graphdef, params)
        if plan is not None:
            if with_expert_ids:
                raise ValueError("scoring with expert ids runs on unpacked rows: pass plan=None")
            return _packed_score(model, tokens, completion_mask, plan, settings)

        def one(chunk):
            t, v = chunk
            logp, _, stats = completion_logprobs(
                model,
                t,
                v,
                completion_mask.shape[1],
                temperature=settings.temperature,
                chunk=settings.logprob_chunk,
            )
            return (logp, jnp.swapaxes(stats.expert_ids, 0, 1)) if with_expert_ids else logp

        out = jax.lax.map(one, _minibatches((tokens, valid), settings.minibatches))
        logp, ids = out if with_expert_ids else (out, None)
        logp = logp.reshape(completion_mask.shape) * completion_mask
        if not with_expert_ids:
            return logp
        return logp, ids.reshape(tokens.shape[0], *ids.shape[2:])

    return jax.jit(score)


def _packed_score(model, tokens, completion_mask, plan: packing.PackedRows, settings: UpdateSettings):
    """[B, C] log-probs of every sequence from packed forwards, one per chunk of the plan's single pass,
    put back in row order inside each batch shard."""
    chunks = jax.tree.map(lambda x: x[0], plan)  # [M, S, ...]
    width_c = completion_mask.shape[1]

    def one(rows: packing.PackedRows):
        mb_tokens = packing.gather_sequences(tokens, rows.sequences)
        logp, _, _ = packed_completion_logprobs(
            model, mb_tokens, rows, width_c, temperature=settings.temperature, chunk=settings.logprob_chunk
        )
        return logp  # [S * n, C]

    logp_m = jax.lax.map(one, chunks)
    return packing.scatter_sequences(logp_m, chunks.sequences, tokens.shape[0]) * completion_mask


def replay_layout(mb: RolloutBatch, rows):
    """mb's routing-replay ids as the forward takes them: [L_moe, b, T - 1, k], or packed
    ([L_moe, S * R, W, k]) when `rows` is the minibatch's packing."""
    if rows is None:
        return jnp.swapaxes(mb.expert_ids, 0, 1)
    return packing.packed_replay_ids(mb.expert_ids, rows.row_seq, rows.row_t)


def routed_valid(mb: RolloutBatch, rows):
    """The real tokens of the training forward's positions: [b, T - 1], or [S * R, W] packed."""
    return mb.valid[:, :-1] if rows is None else packing.valid_slots(rows)


def _routed_ids(model, mb: RolloutBatch, rows):
    """The experts `model` routes the training forward's inputs to: [L_moe, b, T - 1, k] (or the
    packed [L_moe, S * R, W, k])."""
    if rows is None:
        return model.forward(mb.tokens[:, :-1], valid_bt=mb.valid[:, :-1]).router_stats.expert_ids
    ids, inputs = packing.forward_inputs(mb.tokens, rows)
    return model.forward(ids, **inputs).router_stats.expert_ids


def make_train_fn(
    graphdef, optimizer: optax.GradientTransformation, settings: UpdateSettings, state_shardings=None
) -> Callable:
    """jit(state, batch, key) -> (state, metrics [iterations, minibatches]); the state is donated.

    state_shardings (a TrainState of shardings, policy.train_state_shardings) pins the new state to the
    old one's layout, which GSPMD would otherwise choose per leaf: equal in and out shardings let the
    donated buffers be reused and keep step 2 from recompiling."""

    def loss_fn(params, mb: RolloutBatch, rows: packing.PackedRows | None):
        """rows: this minibatch's packed layout ([S, ...] leaves) or None (mb's rows as they are)."""
        model = nnx.merge(graphdef, params)
        replay_ids = None
        if settings.routing_replay:
            if mb.expert_ids is None:
                raise ValueError(
                    "routing_replay needs the old policy's expert ids in RolloutBatch.expert_ids"
                )
            replay_ids = replay_layout(mb, rows)
        if rows is None:
            logp, entropy, stats = completion_logprobs(
                model,
                mb.tokens,
                mb.valid,
                mb.completion_len,
                temperature=settings.temperature,
                chunk=settings.logprob_chunk,
                with_entropy=True,
                replay_expert_ids=replay_ids,
            )
        else:
            logp, entropy, stats = packed_completion_logprobs(
                model,
                mb.tokens,
                rows,
                mb.completion_len,
                temperature=settings.temperature,
                chunk=settings.logprob_chunk,
                with_entropy=True,
                replay_expert_ids=replay_ids,
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
        metrics["entropy"] = losses.token_mean(entropy, mask)
        metrics |= losses.logprob_gap_metrics(logp, mb.sampler_logp, mask)
        if settings.ratio_length_edges:
            metrics |= diagnostics.ratio_by_length(logp, mb.old_logp, mask, settings.ratio_length_edges)
        routed_ids = None
        if stats is not None:
            counts = stats.expert_counts  # [MoE layers, E]
            metrics["moe/expert_load"] = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
            metrics["moe/dropped_frac"] = jnp.sum(stats.dropped) / jnp.maximum(jnp.sum(counts), 1.0)
            routed_ids = stats.expert_ids
        if replay_ids is not None:
            # What the replayed forward routed with against the old policy's choices: 0 unless the
            # replay failed to reach a layer.
            metrics["routing/replay_volatility"] = jnp.mean(
                diagnostics.routing_volatility(replay_ids, routed_ids, routed_valid(mb, rows))
            )
        return loss + settings.aux_loss_coef * aux, (metrics, routed_ids)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def volatility(params_before, params_after, routed_ids, mb: RolloutBatch, rows):
        """Routing volatility of one update over mb's tokens: the training forward's own routing is
        the "before" one unless it was replayed; one more forward (two with replay) without grads."""
        before = routed_ids
        if settings.routing_replay:
            before = _routed_ids(nnx.merge(graphdef, params_before), mb, rows)
        after = _routed_ids(nnx.merge(graphdef, params_after), mb, rows)
        return diagnostics.volatility_metrics(before, after, routed_valid(mb, rows))

    def update(state: TrainState, xs):
        mb, rows = xs
        (total, (metrics, routed_ids)), grads = grad_fn(state.params, mb, rows)
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
        if settings.routing_volatility and routed_ids is not None:
            metrics |= volatility(state.params, new_state.params, routed_ids, mb, rows)
        return new_state, metrics

    def rows_split(minibatches: RolloutBatch) -> RolloutBatch:
        """Keeps each minibatch's rows split over the batch axes: GSPMD would otherwise replicate the
        shuffled (gathered) batch, and every device would run the whole minibatch."""
        if state_shardings is None:
            return minibatches
        mesh = jax.tree.leaves(state_shardings)[0].mesh
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 2))))
            ),
            minibatches,
        )

    def train(state: TrainState, batch: RolloutBatch, key):
        plan, sequences = batch.packing, dataclasses.replace(batch, packing=None)
        if plan is not None:
            if plan.sequences.shape[:2] != (settings.iterations, settings.minibatches):
                raise ValueError(
                    f"the packing plan has {plan.sequences.shape[:2]} (passes, minibatches); the update "
                    f"runs {(settings.iterations, settings.minibatches)}"
                )

            def packed_pass(state, pass_plan):
                # [M, S * n, ...]: each minibatch's sequences, gathered inside their batch shards
                minibatches = jax.vmap(
                    lambda seq: jax.tree.map(lambda x: packing.gather_sequences(x, seq), sequences)
                )(pass_plan.sequences)
                return jax.lax.scan(update, state, rows_split((minibatches, pass_plan)))

            return jax.lax.scan(packed_pass, state, plan)

        def one_pass(state, pass_key):
            order = jax.random.permutation(pass_key, batch.tokens.shape[0])
            shuffled = jax.tree.map(lambda x: x[order], sequences)
            return jax.lax.scan(
                update, state, (rows_split(_minibatches(shuffled, settings.minibatches)), None)
            )

        return jax.lax.scan(one_pass, state, jax.random.split(key, settings.iterations))

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(train, donate_argnums=(0,), out_shardings=out_shardings)
