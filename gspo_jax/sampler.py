"""Rollout generation: one prefill per prompt, then a decode loop inside one jitted `lax.while_loop`.

`Sampler(graphdef, ...)` is built once from static settings; `sampler(params, prompt_ids,
prompt_mask, rng)` compiles once per (batch, prompt width) shape and takes the parameters as a
jit argument, so new (or bf16 rollout) parameters each step reuse the compiled program.

What happens inside the one jitted call:
  1. Prefill the B left-padded prompts into a KV cache of P + N - 1 slots (the last sampled token
     is never fed back), and take the logits of each prompt's last token.
  2. Repeat the cache and those logits G times (prompt-major rows): G samples share one prefill.
  3. Sample token 0; then each loop step feeds the previous token at slot P + i (position
     prompt_len + i), samples the next one, and records it. The loop ends after N tokens or as
     soon as every row has produced a stop id. Cache and outputs are loop carries, updated in
     place; nothing leaves the device and no Python runs per token. When the model decodes with
     unrolled layers (ModelConfig.decode_layers; on CPU), each layer's parameters are sliced out of
     the layer stacks once, before the loop (one copy of the layers' weights for the call's
     duration): XLA copies a slice taken inside the loop at every step. The cache is allocated inside
     the call and never crosses the jit boundary, so there is no buffer to donate.
  4. With compact_rows, the loop is up to three loops: once at most half the rows are still running,
     those rows (their cache, last token and position) are gathered into a batch of half the size
     and decoding goes on there; outputs are written to each row's original place.

Speed on CPU: pass a bfloat16 copy of the parameters for rollouts (the MoE decode path then reads
half the expert bytes) but keep the KV cache in float32: XLA:CPU converts a bfloat16 cache as a
whole on every in-place write. On GPU/TPU a bfloat16 cache is the usual choice.

Log-probs: each sampled token's log-prob is log_softmax(logits / T)[token] in fp32 under the
UNTRUNCATED temperature-scaled distribution, even when top-k / top-p restrict what can be sampled.
That is the quantity the trainer recomputes for pi_old and pi_theta (it has no truncation), so the
sampler's log-probs can stand in for pi_old and the sampler-vs-trainer gap measures only numerics.
Greedy decoding (temperature 0) reports log-probs under temperature 1.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax.models.layers import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    """Completions of B prompts x G samples, rows prompt-major (rows i*G .. i*G+G-1 are prompt i's).

    completion_ids: [B*G, N] int32, pad_id after the stop token (or after N tokens);
    completion_mask: [B*G, N] int32, 1 on generated tokens including the stop token, else 0;
    logprobs: [B*G, N] float32, log-prob of each generated token (see module docstring), 0 where masked;
    lengths: [B*G] int32, number of generated tokens (the mask's row sums).
    """

    completion_ids: jax.Array
    completion_mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


def policy_logprobs(logits_rv, temperature: float):
    """log_softmax(logits / T) in fp32, [R, V]; temperature 0 (greedy) scores under T = 1."""
    scale = temperature if temperature > 0 else 1.0
    return jax.nn.log_softmax(logits_rv.astype(jnp.float32) / scale, axis=-1)


def _row_uniforms(key, rows: int, row_r=None):
    """[R, 1] uniforms in [0, 1): `rows` of them from `key`, or with row_r [R] the draws of those rows
    out of `rows`, so a row's draw does not depend on which other rows are present."""
    u = jax.random.uniform(key, (rows, 1), jnp.float32)
    return u if row_r is None else u[row_r]


def _inverse_cdf_choice(uniform_r1, weights_rk):
    """One index per row drawn with probability weights / row sum (weights >= 0, not all zero).

    Uses one uniform per row (uniform_r1 [R, 1] in [0, 1)) instead of a Gumbel draw per vocabulary
    entry; 1 - u lies in (0, 1], so an index with zero weight is never returned.
    """
    cdf = jnp.cumsum(weights_rk, axis=-1)
    u = 1.0 - uniform_r1
    index = jnp.sum(cdf < u * cdf[:, -1:], axis=-1)
    return jnp.minimum(index, weights_rk.shape[-1] - 1).astype(jnp.int32)


def _nucleus_floor(p_rv, top_p: float):
    """[R] smallest probability q such that the tokens strictly more likely than q hold < top_p mass.

    The nucleus is {p >= q}: a token is kept iff the mass above it is below top_p (so the token that
    crosses top_p is kept). Found by bisection over float32 bit patterns (31 masked sums over the
    vocabulary), which is far cheaper on large vocabularies than sorting them.
    """
    mass_above = lambda q_r: jnp.sum(jnp.where(p_rv > q_r[:, None], p_rv, 0.0), axis=-1)
    bits = lambda q: jax.lax.bitcast_convert_type(q, jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds  # mass_above(hi) < top_p; every pattern below lo has mass_above >= top_p
        mid = lo + (hi - lo) // 2
        below = mass_above(jax.lax.bitcast_convert_type(mid, jnp.float32)) < top_p
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    hi = bits(jnp.max(p_rv, axis=-1))
    _, hi = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(hi), hi))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def sample_next(
    key, logits_rv, *, temperature: float, top_k: int = 0, top_p: float = 1.0, row_r=None, num_rows=None
):
    """Next tokens [R] int32 and their log-probs [R] float32 from logits [R, V].

    temperature 0: argmax. Otherwise softmax(logits / T) restricted to the top_k most likely tokens
    (0: all), then to the smallest most-likely prefix whose renormalised mass reaches top_p (the token
    that crosses top_p is kept); the same order as transformers' TopK then TopP warpers. Log-probs
    are always under the untruncated distribution (see the module docstring). row_r [R] with
    num_rows: these rows are rows row_r of a batch of num_rows, and each takes that row's draw.
    """
    uniform = lambda: _row_uniforms(key, num_rows or logits_rv.shape[0], row_r)
    logp_rv = policy_logprobs(logits_rv, temperature)
    vocab = logits_rv.shape[-1]
    if temperature <= 0:
        tokens = jnp.argmax(logits_rv, axis=-1).astype(jnp.int32)
    elif top_k <= 0:
        p_rv = jnp.exp(logp_rv)
        if top_p < 1.0:
            p_rv = jnp.where(p_rv >= _nucleus_floor(p_rv, top_p)[:, None], p_rv, 0.0)
        tokens = _inverse_cdf_choice(uniform(), p_rv)
    else:
        cand_logp_rk, cand_ids_rk = jax.lax.top_k(logp_rv, min(top_k, vocab))  # most likely first
        cand_p_rk = jax.nn.softmax(cand_logp_rk, axis=-1)
        if top_p < 1.0:
            mass_before_rk = jnp.cumsum(cand_p_rk, axis=-1) - cand_p_rk
            cand_p_rk = jnp.where(mass_before_rk < top_p, cand_p_rk, 0.0)
        choice = _inverse_cdf_choice(uniform(), cand_p_rk)
        tokens = jnp.take_along_axis(cand_ids_rk, choice[:, None], axis=-1)[:, 0]
    return tokens, jnp.take_along_axis(logp_rv, tokens[:, None], axis=-1)[:, 0]


class _DecodeState(NamedTuple):
    """The decode loop's carry. R running rows (all B*G, or fewer after compaction); the outputs keep
    all B*G rows, and running row r writes output row row_r[r]."""

    step: jax.Array  # index of the last recorded token
    row_r: jax.Array  # [R] int32 output row
    first_pos_r: jax.Array  # [R] int32 position of token 0
    token_r: jax.Array  # [R] last sampled token
    done_r: jax.Array  # [R] bool: the row has produced a stop id
    cache: KVCache  # R rows
    ids_on: jax.Array  # [B*G, N]
    mask_on: jax.Array
    logp_on: jax.Array


# Compaction (Sampler's compact_rows): halve the running rows at most this many times, never below
# this many rows. Each size compiles its own decode step.
# With fewer new tokens than MIN_COMPACT_TOKENS there are too few steps left to repay those compiles.
MAX_COMPACTIONS = 2
MIN_COMPACT_ROWS = 8
MIN_COMPACT_TOKENS = 32


def row_phases(rows: int, new_tokens: int, compact: bool) -> list[int]:
    """Row counts the decode loop runs at: `rows`, then (compacting, with at least MIN_COMPACT_TOKENS
    new tokens) halves while even and at least MIN_COMPACT_ROWS, at most MAX_COMPACTIONS times."""
    phases = [rows]
    while (
        compact
        and new_tokens >= MIN_COMPACT_TOKENS
        and len(phases) <= MAX_COMPACTIONS
        and phases[-1] % 2 == 0
        and phases[-1] // 2 >= MIN_COMPACT_ROWS
    ):
        phases.append(phases[-1] // 2)
    return phases


class Sampler:
    """Jitted generation of G completions per prompt from a model's graphdef and static settings.

    Args:
      graphdef: `graphdef, params = nnx.split(model)`; params are passed per call.
      max_new_tokens: N, the completion width.
      num_samples: G completions per prompt (sharing one prefill).
      temperature: 0 for greedy, else softmax temperature.
      top_k: sample among the k most likely tokens (0: no limit).
      top_p: nucleus mass in (0, 1] (1: no limit).
      stop_ids: token ids that end a completion (the stop token is kept, with mask 1).
      pad_id: written after a completion ends.
      cache_dtype: KV cache dtype (e.g. "bfloat16"); default the model's compute dtype (on CPU
        float32 is faster, see the module docstring).
      out_shardings: optional jax.jit out_shardings for the SampleOutput (e.g. batch-sharded rows).
      compact_rows: once at most half the rows are still running, continue the loop on those rows
        only (`row_phases`: twice at most, at least MIN_COMPACT_ROWS rows, with max_new_tokens at
        least MIN_COMPACT_TOKENS). A step's cost falls with its rows where decode is compute-bound, as
        on CPU (medium bench model: 64 rows 83 ms, 32 rows 56 ms, 16 rows 48 ms); where it is bound by
        reading the weights (accelerators at these batches) it gains little. Needs the rows on one
        device: compacting batch-sharded rows would gather the cache across devices. Samples are the
        same with and without it (a row keeps its own random draw).
    """

    def __init__(
        self,
        graphdef,
        *,
        max_new_tokens: int,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] = (),
        pad_id: int = 0,
        cache_dtype=None,
        out_shardings=None,
        compact_rows: bool = False,
    ):
        errors = []
        if max_new_tokens < 1:
            errors.append(f"max_new_tokens={max_new_tokens} must be >= 1")
        if num_samples < 1:
            errors.append(f"num_samples={num_samples} must be >= 1")
        if temperature < 0:
            errors.append(f"temperature={temperature} must be >= 0 (0 means greedy)")
        if top_k < 0:
            errors.append(f"top_k={top_k} must be >= 0 (0 means no top-k limit)")
        if not 0.0 < top_p <= 1.0:
            errors.append(f"top_p={top_p} must be in (0, 1] (1 means no nucleus limit)")
        if errors:
            raise ValueError("Invalid Sampler settings:\n  " + "\n  ".join(errors))
        self.graphdef = graphdef
        self.max_new_tokens = int(max_new_tokens)
        self.num_samples = int(num_samples)
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.pad_id = int(pad_id)
        self.cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype)
        self.compact_rows = bool(compact_rows)
        self._generate = jax.jit(self._generate_impl, out_shardings=out_shardings)

    def __call__(self, params, prompt_ids, prompt_mask, rng) -> SampleOutput:
        """prompt_ids, prompt_mask: [B, P], left-padded (mask 1 on real tokens); rng: a jax PRNG key."""
        if len(prompt_ids.shape) != 2 or tuple(prompt_mask.shape) != tuple(prompt_ids.shape):
            raise ValueError(
                f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must both "
                "be [batch, prompt_len]: left-pad prompts to one width and pass a mask of the same shape"
            )
        return self._generate(params, prompt_ids, prompt_mask, rng)

    def _sample(self, rng, step, logits_rv, row_r, num_rows):
        return sample_next(
            jax.random.fold_in(rng, step),
            logits_rv,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            row_r=row_r,
            num_rows=num_rows,
        )

    def _record(self, state: _DecodeState, step, tokens_r, logp_r) -> _DecodeState:
        """Writes column `step` for rows still running and marks rows that produced a stop id."""
        alive_r = ~state.done_r
        ids = jnp.where(alive_r, tokens_r, self.pad_id).astype(jnp.int32)
        stopped_r = alive_r & jnp.isin(tokens_r, jnp.asarray(self.stop_ids, jnp.int32))
        column = lambda buf, col: buf.at[state.row_r, step].set(col.astype(buf.dtype), unique_indices=True)
        return state._replace(
            step=step,
            token_r=ids,
            done_r=state.done_r | stopped_r,
            ids_on=column(state.ids_on, ids),
            mask_on=column(state.mask_on, alive_r.astype(jnp.int32)),
            logp_on=column(state.logp_on, jnp.where(alive_r, logp_r, 0.0)),
        )

    @staticmethod
    def _keep_running(state: _DecodeState, rows: int) -> _DecodeState:
        """The first `rows` rows of the carry with running rows first (in their order); the caller
        knows at most `rows` are running."""
        keep_r = jnp.argsort(state.done_r, stable=True)[:rows]
        return state._replace(
            row_r=state.row_r[keep_r],
            first_pos_r=state.first_pos_r[keep_r],
            token_r=state.token_r[keep_r],
            done_r=state.done_r[keep_r],
            cache=state.cache.take_rows(keep_r),
        )

    def _generate_impl(self, params, prompt_ids, prompt_mask, rng) -> SampleOutput:
        model = nnx.merge(self.graphdef, params)
        batch, width = prompt_ids.shape
        g, n = self.num_samples, self.max_new_tokens
        valid_bp = prompt_mask.astype(bool)
        cache = model.init_cache(batch, width + n - 1, self.cache_dtype)
        # Sliced once here: a slice of the layer stacks inside the loop would be copied every step.
        layer_params = None if cache.stacked else model.layer_params()
        prefill = model.forward(
            prompt_ids.astype(jnp.int32),
            valid_bt=valid_bp,
            cache=cache,
            cache_start=0,
            layer_params=layer_params,
        )
        last_logits_bv = model.logits(prefill.hidden[:, -1])
        # G samples per prompt: repeat the prefilled cache, not the prefill.
        repeat = lambda x: jnp.repeat(x, g, axis=0)
        rows = batch * g
        state = _DecodeState(
            step=jnp.zeros((), jnp.int32),
            row_r=jnp.arange(rows, dtype=jnp.int32),
            first_pos_r=repeat(jnp.sum(valid_bp, axis=-1, dtype=jnp.int32)),
            token_r=jnp.zeros((rows,), jnp.int32),
            done_r=jnp.zeros((rows,), bool),
            cache=prefill.cache.repeat_rows(g),
            ids_on=jnp.full((rows, n), self.pad_id, jnp.int32),
            mask_on=jnp.zeros((rows, n), jnp.int32),
            logp_on=jnp.zeros((rows, n), jnp.float32),
        )
        state = self._record(state, 0, *self._sample(rng, 0, repeat(last_logits_bv), None, None))

        def decode_one(state):
            fed = state.step  # feed token `fed` at slot width + fed, position first_pos + fed
            out = model.forward(
                state.token_r[:, None],
                valid_bt=~state.done_r[:, None],
                positions_bt=(state.first_pos_r + fed)[:, None],
                cache=state.cache,
                cache_start=width + fed,
                layer_params=layer_params,
            )
            step = fed + 1
            logits_rv = model.logits(out.hidden[:, 0])
            tokens_r, logp_r = self._sample(rng, step, logits_rv, state.row_r, rows)
            return self._record(state._replace(cache=out.cache), step, tokens_r, logp_r)

        phases = row_phases(rows, n, self.compact_rows)
        for i, phase_rows in enumerate(phases):
            if i:
                state = self._keep_running(state, phase_rows)
            # A phase ends after N tokens, when every row is done, or (before the last phase) when the
            # running rows fit the next phase.
            fits_next = phases[i + 1] if i + 1 < len(phases) else -1

            def running(state, fits_next=fits_next):
                return (state.step + 1 < n) & (jnp.sum(~state.done_r) > max(fits_next, 0))

            state = jax.lax.while_loop(running, decode_one, state)
        return SampleOutput(
            completion_ids=state.ids_on,
            completion_mask=state.mask_on,
            logprobs=state.logp_on,
            lengths=jnp.sum(state.mask_on, axis=-1, dtype=jnp.int32),
        )
