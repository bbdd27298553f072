"""The jitted phases of one RL step (rl_step.py calls them): scoring completions and the minibatch updates.

A rollout batch holds B = N*G sequences laid out as [left-padded prompt (P) | completion (C)], T = P + C
(shape letters: BUILD_NOTES.md, "Shapes").
`score` computes per-token log-probs of the completions (old policy or reference); `train` runs
`iterations` passes of `minibatches` AdamW updates of the policy loss in one compiled lax.scan, so one
RL step costs one dispatch per phase and no host round trip. With `accumulation` K > 1 each update's
gradient is summed over K micro-batches of the minibatch (one forward + backward each), so activations
are those of a micro-batch; one update's gradient and metrics are minibatch.py's.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gspo_jax import diagnostics, minibatch, packing
from gspo_jax.logprobs import completion_logprobs, packed_completion_logprobs
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
    chunks (settings.chunks); with a packing plan (packing.PackedRows of one pass, one entry per chunk)
    the forward runs on packed rows. with_expert_ids: (log-probs, expert ids [B, L_moe, T - 1, k] the
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


def make_train_fn(
    graphdef, optimizer: optax.GradientTransformation, settings: UpdateSettings, state_shardings=None
) -> Callable:
    """jit(state, batch, key) -> (state, metrics [iterations, minibatches]); the state is donated.

    Each update's gradient is summed over settings.accumulation micro-batches (minibatch.gradients:
    exactly the whole minibatch's gradient of the policy loss); its metrics are the whole minibatch's.

    state_shardings (a TrainState of shardings, policy.train_state_shardings) pins the new state to the
    old one's layout, which GSPMD would otherwise choose per leaf: equal in and out shardings let the
    donated buffers be reused and keep step 2 from recompiling."""
    param_shardings = None if state_shardings is None else state_shardings.params

    def update(state: TrainState, xs):
        """One optimizer update on a minibatch given as [K, ...] micro-batches (xs: batch, packing)."""
        micro_mb, micro_rows = xs
        grads, total, out = minibatch.gradients(
            graphdef, settings, state.params, micro_mb, micro_rows, param_shardings
        )
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
        metrics = minibatch.metrics(settings, micro_mb, micro_rows, out)
        metrics |= {"loss": total, "grad_norm": grad_norm, "update_skipped": (~finite).astype(jnp.float32)}
        if settings.routing_volatility and "routed_ids" in out:
            metrics |= minibatch.volatility(
                graphdef, settings, state.params, new_state.params, out["routed_ids"], micro_mb, micro_rows
            )
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
        return jax.tree.map(
            lambda x: x.reshape(settings.minibatches, settings.accumulation, *x.shape[1:]), tree
        )

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
