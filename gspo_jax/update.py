"""The jitted phases of one RL step (rl_step.py calls them): scoring completions and the minibatch updates.

A rollout batch holds B = N*G sequences laid out as [left-padded prompt (P) | completion (C)], T = P + C
(shape letters: BUILD_NOTES.md, "Shapes").
`score` computes per-token log-probs of the completions (old policy or reference); `train` runs
`iterations` passes of `minibatches` AdamW updates of the policy loss in one compiled lax.scan, so one
RL step costs one dispatch per phase and no host round trip. With `accumulation` K > 1 each update's
gradient is summed over K micro-batches of the minibatch (one forward + backward each), so activations
are those of a micro-batch.
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
    accumulation: int = 1  # micro-batches per minibatch update, gradients summed over them

    @property
    def chunks(self) -> int:
        """Forward chunks per pass over the batch: every micro-batch of every minibatch."""
        return self.minibatches * self.accumulation

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
            accumulation=cfg.algo.grad_accumulation,
            ratio_length_edges=(
                diagnostics.length_bin_edges(cfg.rollout.max_new_tokens) if cfg.log.ratio_by_length else ()
            ),
        )


def _minibatches(tree, num: int):
    """[B, ...] leaves -> [num, B / num, ...]."""
    return jax.tree.map(lambda x: x.reshape(num, x.shape[0] // num, *x.shape[1:]), tree)


def make_score_fn(graphdef, settings: UpdateSettings, with_expert_ids: bool = False) -> Callable:
    """jit(params, tokens, valid, completion_mask, plan=None) -> log-probs [B, C], in micro-batch-sized
    chunks (settings.chunks); with a packing plan (packing.PackedRows of one pass, its minibatches the chunks) the
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

        out = jax.lax.map(one, _minibatches((tokens, valid), settings.chunks))
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


def _per_micro(fn, xs, micro: int):
    """fn over the leading [K] micro-batch dim of xs, stacked ([K, ...] outputs); K = 1 runs no loop."""
    if micro == 1:
        return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(fn, xs)


def _rows_of_micro(x):
    """[K, b, ...] per-micro-batch rows -> the minibatch's [b * K, ...], row-major in b: b is split over
    the batch shards, and merged this way it stays split (K-major would gather it on every device)."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _layers_of_micro(x):
    """[K, L, b, ...] per-micro-batch, layer-major (expert ids) -> [L, b * K, ...]."""
    return jax.vmap(_rows_of_micro, in_axes=1)(x)


def micro_weights(completion_mask_kbc, aggregation) -> jax.Array:
    """[K] each micro-batch's share of its minibatch's aggregation denominator (0 for all when the
    minibatch has no completion token): the weights that make the summed micro-batch gradients the
    minibatch's gradient."""
    counts = jax.vmap(lambda m: losses.aggregation_denominator(aggregation, m))(completion_mask_kbc)
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def make_train_fn(
    graphdef, optimizer: optax.GradientTransformation, settings: UpdateSettings, state_shardings=None
) -> Callable:
    """jit(state, batch, key) -> (state, metrics [iterations, minibatches]); the state is donated.

    Each update sums its gradient over settings.accumulation micro-batches, micro-batch k's policy loss
    weighted by its share of the minibatch's aggregation denominator (micro_weights), so the sum is
    the whole minibatch's gradient; the load-balancing loss is the micro-batches' mean (it is not
    linear in the tokens: routing fractions are per micro-batch). Metrics are computed once on the
    whole minibatch's log-probs.

    state_shardings (a TrainState of shardings, policy.train_state_shardings) pins the new state to the
    old one's layout, which GSPMD would otherwise choose per leaf: equal in and out shardings let the
    donated buffers be reused and keep step 2 from recompiling."""
    micro = settings.accumulation

    def forward(model, mb: RolloutBatch, rows: packing.PackedRows | None):
        """One micro-batch's training forward: (logp [b, C], entropy [b, C], router stats or None).
        rows: its packed layout ([S, ...] leaves) or None (mb's rows as they are)."""
        replay_ids = None
        if settings.routing_replay:
            if mb.expert_ids is None:
                raise ValueError(
                    "routing_replay needs the old policy's expert ids in RolloutBatch.expert_ids"
                )
            replay_ids = replay_layout(mb, rows)
        kwargs = {
            "temperature": settings.temperature,
            "chunk": settings.logprob_chunk,
            "with_entropy": True,
            "replay_expert_ids": replay_ids,
        }
        if rows is None:
            return completion_logprobs(model, mb.tokens, mb.valid, mb.completion_len, **kwargs)
        return packed_completion_logprobs(model, mb.tokens, rows, mb.completion_len, **kwargs)

    def micro_loss(params, mb: RolloutBatch, rows, weight):
        """weight x the micro-batch's policy loss + its load-balancing loss / K, and what the minibatch's
        metrics need from its forward."""
        logp, entropy, stats = forward(nnx.merge(graphdef, params), mb, rows)
        policy, _ = losses.policy_loss(
            logp,
            mb.old_logp,
            mb.advantages,
            mb.completion_mask,
            level=settings.level,
            eps_low=settings.eps_low,
            eps_high=settings.eps_high,
            aggregation=settings.aggregation,
            ref_logp=mb.ref_logp if settings.beta > 0 else None,
            beta=settings.beta,
        )
        aux = load_balancing_loss(stats)
        out = {"logp": logp, "entropy": entropy, "aux": aux}
        if stats is not None:
            out |= {"counts": stats.expert_counts, "dropped": stats.dropped, "routed_ids": stats.expert_ids}
        return weight * policy + settings.aux_loss_coef * aux / micro, jax.lax.stop_gradient(out)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def gradients(params, micro_mb: RolloutBatch, micro_rows):
        """(gradient, loss, forward outputs [K, ...]) of one minibatch given as [K, ...] micro-batches."""
        if micro == 1:
            # the K = 1 loss is the minibatch's own: no weighting (a batch without tokens has loss 0)
            first = jax.tree.map(lambda x: x[0], (micro_mb, micro_rows))
            (loss, out), grads = grad_fn(params, *first, 1.0)
            return grads, loss, jax.tree.map(lambda x: x[None], out)
        weights = micro_weights(micro_mb.completion_mask, settings.aggregation)

        def one(acc, xs):
            (loss, out), grads = grad_fn(params, *xs)
            return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads), (loss, out)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if state_shardings is not None:  # laid out like the parameters, not left to GSPMD per leaf
            zeros = jax.lax.with_sharding_constraint(zeros, state_shardings.params)
        summed, (loss_k, out) = jax.lax.scan(one, zeros, (micro_mb, micro_rows, weights))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), summed, params)
        return grads, jnp.sum(loss_k), out

    def minibatch_metrics(micro_mb: RolloutBatch, micro_rows, out) -> dict:
        """The update's metrics over the whole minibatch, from its micro-batches' forward outputs."""
        mb = jax.tree.map(_rows_of_micro, micro_mb)
        logp, entropy, mask = _rows_of_micro(out["logp"]), _rows_of_micro(out["entropy"]), mb.completion_mask
        _, metrics = losses.policy_loss(
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
        metrics = dict(metrics)
        metrics["moe/aux_loss"] = jnp.mean(out["aux"])
        metrics["entropy"] = losses.token_mean(entropy, mask)
        metrics |= losses.logprob_gap_metrics(logp, mb.sampler_logp, mask)
        if settings.ratio_length_edges:
            metrics |= diagnostics.ratio_by_length(logp, mb.old_logp, mask, settings.ratio_length_edges)
        if "counts" in out:
            counts = jnp.sum(out["counts"], axis=0)  # [MoE layers, E]
            metrics["moe/expert_load"] = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
            metrics["moe/dropped_frac"] = jnp.sum(out["dropped"]) / jnp.maximum(jnp.sum(counts), 1.0)
            if settings.routing_replay:
                # What the replayed forward routed with against the old policy's choices: 0 unless the
                # replay failed to reach a layer.
                replayed = jax.vmap(replay_layout)(micro_mb, micro_rows)
                metrics["routing/replay_volatility"] = jnp.mean(
                    diagnostics.routing_volatility(
                        _layers_of_micro(replayed),
                        _layers_of_micro(out["routed_ids"]),
                        _rows_of_micro(jax.vmap(routed_valid)(micro_mb, micro_rows)),
                    )
                )
        return metrics

    def volatility(params_before, params_after, routed_ids, micro_mb: RolloutBatch, micro_rows):
        """Routing volatility of one update over the minibatch's tokens: the training forward's own
        routing is the "before" one unless it was replayed; one more forward per micro-batch (two
        with replay) without grads."""

        def ids_of(params):
            model = nnx.merge(graphdef, params)
            return _per_micro(lambda xs: _routed_ids(model, *xs), (micro_mb, micro_rows), micro)

        before = ids_of(params_before) if settings.routing_replay else routed_ids
        valid = jax.vmap(routed_valid)(micro_mb, micro_rows)
        return diagnostics.volatility_metrics(
            _layers_of_micro(before), _layers_of_micro(ids_of(params_after)), _rows_of_micro(valid)
        )

    def update(state: TrainState, xs):
        """One optimizer update on a minibatch given as [K, ...] micro-batches (xs: batch, packing)."""
        micro_mb, micro_rows = xs
        grads, total, out = gradients(state.params, micro_mb, micro_rows)
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
        metrics = minibatch_metrics(micro_mb, micro_rows, out)
        metrics |= {"loss": total, "grad_norm": grad_norm, "update_skipped": (~finite).astype(jnp.float32)}
        if settings.routing_volatility and "routed_ids" in out:
            metrics |= volatility(state.params, new_state.params, out["routed_ids"], micro_mb, micro_rows)
        return new_state, metrics

    def rows_split(minibatches):
        """Keeps each micro-batch's rows ([M, K, rows, ...] leaves) split over the batch axes: GSPMD
        would otherwise replicate the shuffled (gathered) batch, and every device would run the whole
        minibatch."""
        if state_shardings is None:
            return minibatches
        mesh = jax.tree.leaves(state_shardings)[0].mesh
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, PartitionSpec(None, None, BATCH_AXES, *([None] * (x.ndim - 3))))
            ),
            minibatches,
        )

    def by_update(tree):
        """[M * K, ...] forward chunks -> [M, K, ...]: each minibatch update's micro-batches."""
        return jax.tree.map(lambda x: x.reshape(settings.minibatches, micro, *x.shape[1:]), tree)

    def train(state: TrainState, batch: RolloutBatch, key):
        plan, sequences = batch.packing, dataclasses.replace(batch, packing=None)
        if plan is not None:
            if plan.sequences.shape[:2] != (settings.iterations, settings.chunks):
                raise ValueError(
                    f"the packing plan has {plan.sequences.shape[:2]} (passes, micro-batches per pass); the "
                    f"update runs {(settings.iterations, settings.chunks)} (algo.iterations, "
                    "algo.minibatches x algo.grad_accumulation): plan with minibatches=settings.chunks"
                )

            def packed_pass(state, pass_plan):
                # [M * K, S * n, ...]: each micro-batch's sequences, gathered inside their batch shards
                chunks = jax.vmap(
                    lambda seq: jax.tree.map(lambda x: packing.gather_sequences(x, seq), sequences)
                )(pass_plan.sequences)
                return jax.lax.scan(update, state, rows_split(by_update((chunks, pass_plan))))

            return jax.lax.scan(packed_pass, state, plan)

        def one_pass(state, pass_key):
            order = jax.random.permutation(pass_key, batch.tokens.shape[0])
            shuffled = jax.tree.map(lambda x: x[order], sequences)
            chunks = by_update(_minibatches(shuffled, settings.chunks))
            return jax.lax.scan(update, state, (rows_split(chunks), None))

        return jax.lax.scan(one_pass, state, jax.random.split(key, settings.iterations))

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(train, donate_argnums=(0,), out_shardings=out_shardings)
