"""Token log-probs (and entropies) of a model's completions, from final hidden states chunked over time.

`token_logprobs(model, tokens, completion_len)` is the public per-token helper; `completion_logprobs`
also returns entropies and router statistics for the trainer.

The full fp32 log-softmax over a real vocabulary is huge ([B, T, 151936] floats is 600 KB per
token), so logits exist one time chunk at a time: a `lax.map` over chunks of `chunk_size`
positions, each chunk under `jax.checkpoint` so the backward pass recomputes that chunk's logits
instead of storing all of them. Peak extra memory is about B * chunk_size * V * 4 bytes times a
small constant, whatever T is.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from gspo_jax import packing


def lm_head_logits(hidden_xd, lm_head_dv, precision=jax.lax.Precision.HIGHEST):
    """[..., V] float32 logits: hidden @ lm_head with fp32 accumulation and output, whatever the input
    dtype. The sampler and the trainer both use this, so with bf16 compute their log-probs differ only
    by the hidden states (a bf16 [.., V] result would round each logit by up to ~1e-2)."""
    return jnp.einsum(
        "...d,dv->...v", hidden_xd, lm_head_dv, precision=precision, preferred_element_type=jnp.float32
    )


# prevent_cse=False is safe (and cheaper) because the call sits inside a scan (lax.map).
@functools.partial(jax.checkpoint, static_argnums=(4, 5), prevent_cse=False)
def _chunk_logprobs(hidden_bkd, lm_head_dv, targets_bk, temperature, with_entropy, precision):
    """log softmax(hidden @ W / temperature)[target] for one chunk, fp32, [B, K] (and entropy)."""
    logits_bkv = lm_head_logits(hidden_bkd, lm_head_dv, precision) / temperature
    log_norm_bk = jax.nn.logsumexp(logits_bkv, axis=-1)
    # mode="clip": an out-of-range id (padding such as -100) reads a finite wrong value, which the
    # caller's completion mask drops; the default "fill" mode would put NaN there.
    target_logit_bk = jnp.take_along_axis(logits_bkv, targets_bk[..., None], axis=-1, mode="clip")[..., 0]
    logp_bk = target_logit_bk - log_norm_bk
    if not with_entropy:
        return logp_bk
    probs_bkv = jnp.exp(logits_bkv - log_norm_bk[..., None])
    entropy_bk = log_norm_bk - jnp.sum(probs_bkv * logits_bkv, axis=-1)
    return logp_bk, entropy_bk


def token_logprobs_from_hidden(
    hidden_btd,
    lm_head_dv,
    targets_bt,
    *,
    temperature=1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
    precision=jax.lax.Precision.HIGHEST,
):
    """Log-probability of each target token under softmax(hidden @ lm_head / temperature).

    Args:
      hidden_btd: [B, T, D] final (normed) hidden states, any float dtype.
      lm_head_dv: [D, V] output projection (pass embedding.T for tied embeddings).
      targets_bt: [B, T] int token ids whose log-prob is wanted at each position (the caller
        shifts them). Ids outside [0, V) give finite garbage; mask those positions downstream.
      temperature: the sampler's temperature; logits are divided by it.
      chunk_size: time positions per chunk (static). T is padded internally to a multiple of
        min(chunk_size, T). Memory per chunk is about B * chunk_size * V * 4 bytes.
      with_entropy: also return the per-token entropy of the temperature-scaled distribution.
      precision: matmul precision. HIGHEST keeps fp32 operands in true fp32 (GPU TF32 or TPU
        bf16 passes would shift log-probs by far more than a 3e-4 clip width); for bf16 operands
        the products are exact and accumulation is fp32 either way.

    Returns:
      logp_bt [B, T] float32, or (logp_bt, entropy_bt) with with_entropy=True.
    """
    hidden_btd, lm_head_dv, targets_bt = map(jnp.asarray, (hidden_btd, lm_head_dv, targets_bt))
    if hidden_btd.ndim != 3 or lm_head_dv.ndim != 2 or lm_head_dv.shape[0] != hidden_btd.shape[2]:
        raise ValueError(
            f"Expected hidden [B, T, D] and lm_head [D, V]; got {hidden_btd.shape} and "
            f"{lm_head_dv.shape}. For tied embeddings [V, D] pass embedding.T."
        )
    if targets_bt.shape != hidden_btd.shape[:2] or not jnp.issubdtype(targets_bt.dtype, jnp.integer):
        raise ValueError(
            f"targets must be integer ids of shape {hidden_btd.shape[:2]}; got "
            f"{targets_bt.dtype} {targets_bt.shape}."
        )
    if not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    if isinstance(temperature, numbers.Real) and temperature <= 0:
        raise ValueError(
            f"temperature must be > 0; got {temperature} (greedy decoding has no "
            "log-probs to train on; use the sampling temperature)."
        )

    return _chunked_logprobs(
        hidden_btd,
        lm_head_dv,
        targets_bt,
        temperature,
        max(1, min(chunk_size, hidden_btd.shape[1])),
        with_entropy,
        precision,
    )


# Jitted so that eager calls hit the compilation cache (lax.map would re-trace its body on every
# call); inside a caller's jit this is inlined.
@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _chunked_logprobs(hidden_btd, lm_head_dv, targets_bt, temperature, chunk, with_entropy, precision):
    batch, time, dim = hidden_btd.shape
    num_chunks = -(-time // chunk)
    pad = num_chunks * chunk - time
    hidden_cbkd = (
        jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
    )
    targets_cbk = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    def one_chunk(xs):
        hidden_bkd, targets_bk = xs
        return _chunk_logprobs(hidden_bkd, lm_head_dv, targets_bk, temperature, with_entropy, precision)

    def unchunk(x_cbk):
        return x_cbk.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :time]

    return jax.tree.map(unchunk, jax.lax.map(one_chunk, (hidden_cbkd, targets_cbk)))


def completion_logprobs(
    model,
    tokens_bl,
    valid_bl,
    completion_len: int,
    *,
    temperature: float,
    chunk: int,
    with_entropy: bool = False,
    replay_expert_ids=None,
):
    """log pi(y_t | x, y_<t) of the last `completion_len` tokens of each row: ([B, N], entropy, stats).

    The hidden state at position l predicts token l + 1, so the forward runs over tokens[:, :-1] and
    keeps its last `completion_len` positions. Log-probs use the temperature-scaled distribution the
    sampler drew from, so old and new policies are compared on the same distribution.
    replay_expert_ids: [L_moe, B, L - 1, k] expert ids to route with (routing replay; the
    stats.expert_ids of an earlier call on the same tokens), or None.
    """
    out = model.forward(tokens_bl[:, :-1], valid_bt=valid_bl[:, :-1], replay_expert_ids=replay_expert_ids)
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


def packed_completion_logprobs(
    model,
    tokens_nt,
    rows,
    completion_len: int,
    *,
    temperature: float,
    chunk: int,
    with_entropy: bool = False,
    replay_expert_ids=None,
):
    """completion_logprobs of a minibatch's rollout rows tokens_nt [S * n, T], with the forward run on
    the packed rows of `rows` (a packing.PackedRows with [S, ...] leaves): ([S * n, C] log-probs,
    entropy, router stats over the packed rows). replay_expert_ids are in the packed layout
    ([L_moe, S * R, W, k], packing.packed_replay_ids)."""
    ids, inputs = packing.forward_inputs(tokens_nt, rows)
    out = model.forward(ids, replay_expert_ids=replay_expert_ids, **inputs)
    result = token_logprobs_from_hidden(
        packing.gather_hidden(out.hidden, rows.hidden_index),
        model.lm_head_weight(),
        tokens_nt[:, -completion_len:],
        temperature=temperature,
        chunk_size=chunk,
        with_entropy=with_entropy,
    )
    logp, entropy = result if with_entropy else (result, None)
    return logp, entropy, out.router_stats


def token_logprobs(model, tokens_bl, completion_len: int, valid_bl=None, *, temperature: float = 1.0):
    """[B, completion_len] float32 log pi(y_t | x, y_<t) of the last `completion_len` tokens of each row.

    tokens_bl: [B, L] = [prompt | completion] ids; valid_bl: [B, L] bool (default all True; False on
    left padding of prompts and right padding of completions, whose log-probs are then meaningless).
    """
    tokens_bl = jnp.asarray(tokens_bl)
    valid_bl = jnp.ones(tokens_bl.shape, bool) if valid_bl is None else jnp.asarray(valid_bl, bool)
    logp, _, _ = completion_logprobs(
        model, tokens_bl, valid_bl, completion_len, temperature=temperature, chunk=256
    )
    return logp
