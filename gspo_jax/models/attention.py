"""Attention kernels, pure functions of arrays: masks, grouped-query softmax attention, causal
self-attention in query chunks (with a flash path for long packed rows on CPU) and one-token decode
attention over a KV cache. layers.Attention projects, applies RoPE and calls one of them.

Shapes: B rows, T queries, S keys, H query heads, K kv heads, G = H / K query heads per kv head,
D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Masked attention logits use a large finite negative so fully-masked rows (left padding) stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Packed rows at least this wide train through packed_flash_attention on CPU. Measured forward +
# backward per row (segments of 185 tokens): 15.3 vs 10.4 ms at 520 columns, 23 vs 38 ms at 1040,
# 41 vs 118 ms at 2063.
PACKED_FLASH_MIN_COLUMNS = 768


def attention_mask(q_pos_bt, k_pos_bs, k_valid_bs, window: int | None, q_seg_bt=None, k_seg_bs=None):
    """[B, T, S] bool: key s visible to query t iff valid, not in the future, inside the window and
    (with segment ids: packed sequences) in the same segment."""
    q = q_pos_bt[:, :, None]
    k = k_pos_bs[:, None, :]
    mask = k_valid_bs[:, None, :] & (k <= q)
    if window:
        mask &= (q - k) < window
    if q_seg_bt is not None:
        mask &= q_seg_bt[:, :, None] == k_seg_bs[:, None, :]
    return mask


def grouped_attention(q_bthd, k_bshd, v_bshd, mask_bts):
    """Softmax attention in fp32 with grouped query heads (q head h uses kv head h // G)."""
    b, t, heads, d = q_bthd.shape
    kv_heads = k_bshd.shape[2]
    q = q_bthd.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bshd, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bshd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bshd)
    return out.reshape(b, t, heads, d)


def causal_self_attention(
    q_bthd, k_bthd, v_bthd, pos_bt, valid_bt, window: int | None, chunk: int, segments_bt=None
):
    """Attention of a call's tokens over themselves (no cache), in query chunks of `chunk` rows.

    segments_bt: [B, T] int segment ids of packed rows (a key is visible only inside its query's
    segment), or None. Chunk c attends only to keys [0, end of c): the later ones are in its future
    (left-padded rows with positions non-decreasing along T, or packed segments laid end to end),
    which skips about half the [T, T] scores. Each chunk runs under
    jax.checkpoint, so the backward pass recomputes one chunk's scores and probabilities instead of
    keeping all of them: memory O(T * chunk) instead of O(T^2). chunk 0 or >= T: one plain call.
    Packed rows of PACKED_FLASH_MIN_COLUMNS or more on CPU take packed_flash_attention, which also
    skips the key chunks outside each query chunk's segments.
    """
    t = q_bthd.shape[1]
    if not chunk or t <= chunk:
        mask = attention_mask(pos_bt, pos_bt, valid_bt, window, segments_bt, segments_bt)
        return grouped_attention(q_bthd, k_bthd, v_bthd, mask)

    if segments_bt is not None and t >= PACKED_FLASH_MIN_COLUMNS and jax.default_backend() == "cpu":
        flash = packed_flash_attention(window, chunk)
        return flash(q_bthd, k_bthd, v_bthd, pos_bt, valid_bt, segments_bt).astype(v_bthd.dtype)

    def one_chunk(start, end):
        # Slices inside the checkpoint: the backward pass then keeps the whole keys once, not a
        # copy of every chunk's key prefix.
        def attend(q, k, v, pos, valid, seg):
            q_seg, k_seg = (None, None) if seg is None else (seg[:, start:end], seg[:, :end])
            mask = attention_mask(pos[:, start:end], pos[:, :end], valid[:, :end], window, q_seg, k_seg)
            return grouped_attention(q[:, start:end], k[:, :end], v[:, :end], mask)

        return jax.checkpoint(attend, prevent_cse=False)(
            q_bthd, k_bthd, v_bthd, pos_bt, valid_bt, segments_bt
        )

    outputs = [one_chunk(start, min(start + chunk, t)) for start in range(0, t, chunk)]
    return jnp.concatenate(outputs, axis=1)


@functools.cache
def packed_flash_attention(window: int | None, chunk: int):
    """Attention over packed rows with its own VJP: f(q, k, v, pos, valid, segments) -> [B, T, H, D] fp32.

    Query chunk c attends only to key chunks j0(c) .. c. Valid segment ids are non-decreasing along a
    packed row, so the keys a chunk can see form one range, starting at the first key of the least
    segment among its valid queries (over rows). Each chunk's keys are visited in a fori_loop with an
    online softmax; the forward keeps the output and log-sum-exp per query, and the backward
    recomputes each block's probabilities (flash attention's recurrences). Rows of many short
    sequences skip most of the [T, T] blocks that the masked chunked path computes.
    """

    @jax.custom_vjp
    def attention(q, k, v, pos, valid, seg):
        return attention_forward(q, k, v, pos, valid, seg)[0]

    def attention_forward(q, k, v, pos, valid, seg):
        out, lse, first_chunks = _flash_forward(
            *_flash_inputs(q, k, v, pos, valid, seg, chunk), window, chunk
        )
        b, kv_heads, g, width, d = out.shape
        result = jnp.moveaxis(out, 3, 1).reshape(b, width, kv_heads * g, d)[:, : q.shape[1]]
        return result, (q, k, v, pos, valid, seg, out, lse, first_chunks)

    def attention_backward(saved, d_result):
        q, k, v, pos, valid, seg, out, lse, first_chunks = saved
        inputs = _flash_inputs(q, k, v, pos, valid, seg, chunk)
        d_q, d_k, d_v = _flash_backward(*inputs, out, lse, first_chunks, d_result, window, chunk)
        t = q.shape[1]
        no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
        return (
            d_q.reshape(*d_q.shape[:2], -1, d_q.shape[-1])[:, :t].astype(q.dtype),
            d_k[:, :t].astype(k.dtype),
            d_v[:, :t].astype(v.dtype),
            no_grad(pos),
            no_grad(valid),
            no_grad(seg),
        )

    attention.defvjp(attention_forward, attention_backward)
    return attention


def _pad_columns(x, width, value=0):
    return jnp.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _flash_inputs(q_bthd, k_bthd, v_bthd, pos_bt, valid_bt, seg_bt, chunk):
    """fp32 q [B, W, K, G, D], k and v [B, W, K, D], and meta = (pos, valid, seg) [B, W], with the
    columns padded to W, a multiple of chunk (padding is invalid)."""
    b, t, heads, d = q_bthd.shape
    kv_heads = k_bthd.shape[2]
    width = -(-t // chunk) * chunk
    f32 = lambda x: _pad_columns(x.astype(jnp.float32), width)
    q = f32(q_bthd).reshape(b, width, kv_heads, heads // kv_heads, d)
    meta = (_pad_columns(pos_bt, width), _pad_columns(valid_bt, width, False), _pad_columns(seg_bt, width))
    return q, f32(k_bthd), f32(v_bthd), meta


def _first_key_chunk(meta, start, chunk):
    """The first key chunk that query columns [start, start + chunk) can see, over all rows: that
    holding the first key of the least segment among the valid queries (a traced int32 scalar)."""
    _, valid, seg = meta
    queries = jnp.where(
        valid[:, start : start + chunk], seg[:, start : start + chunk], jnp.iinfo(jnp.int32).max
    )
    least = jnp.min(queries, axis=1)  # [B]; a row without valid queries looks at no key
    visible = valid & (seg >= least[:, None])
    first = jnp.where(jnp.any(visible, axis=1), jnp.argmax(visible, axis=1), seg.shape[1])
    return (jnp.min(first) // chunk).astype(jnp.int32)


def _columns(x, start, chunk, axis=1):
    """Columns [start, start + chunk) of x along axis; start a Python int or a traced scalar."""
    return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=axis)


def _block_scores(q_c, k_j, q_meta, k_meta, window):
    """Masked, scaled scores [B, K, G, chunk, chunk] of a query chunk over a key chunk."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q_c, k_j) * q_c.shape[-1] ** -0.5
    mask = attention_mask(q_meta[0], k_meta[0], k_meta[1], window, q_meta[2], k_meta[2])
    return jnp.where(mask[:, None, None], scores, MASK_VALUE)


def _flash_forward(q, k, v, meta, window, chunk):
    """Online-softmax forward: out [B, K, G, W, D] and lse [B, K, G, W] in fp32, and each query
    chunk's first key chunk [W / chunk] (kept for the backward)."""
    b, width, kv_heads, g, d = q.shape
    outs, lses, first_chunks = [], [], []
    for c in range(width // chunk):
        start = c * chunk
        q_c, q_meta = q[:, start : start + chunk], tuple(x[:, start : start + chunk] for x in meta)

        def visit(j, carry, q_c=q_c, q_meta=q_meta):
            top, total, acc = carry
            k_meta = tuple(_columns(x, j * chunk, chunk) for x in meta)
            scores = _block_scores(q_c, _columns(k, j * chunk, chunk), q_meta, k_meta, window)
            new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
            rescale = jnp.exp(top - new_top)
            weights = jnp.exp(scores - new_top[..., None])
            values = jnp.einsum("bkgts,bskd->bkgtd", weights, _columns(v, j * chunk, chunk))
            return new_top, total * rescale + jnp.sum(weights, -1), acc * rescale[..., None] + values

        rows = (b, kv_heads, g, chunk)
        first = _first_key_chunk(meta, start, chunk)
        init = (jnp.full(rows, MASK_VALUE), jnp.zeros(rows), jnp.zeros((*rows, d)))
        top, total, acc = jax.lax.fori_loop(first, c + 1, visit, init)
        total = jnp.where(total > 0, total, 1.0)  # no key visited: padding queries, output 0
        outs.append(acc / total[..., None])
        lses.append(top + jnp.log(total))
        first_chunks.append(first)
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3), jnp.stack(first_chunks)


def _flash_backward(q, k, v, meta, out, lse, first_chunks, d_result_bthd, window, chunk):
    """Gradients of q [B, W, K, G, D], k and v [B, W, K, D] (fp32): each visited block's
    probabilities are recomputed from lse, and d_scores = probs * (d_probs - sum(d_out * out))."""
    width = q.shape[1]
    d_out = jnp.moveaxis(_pad_columns(d_result_bthd.astype(jnp.float32), width).reshape(q.shape), 1, 3)
    delta = jnp.sum(d_out * out, axis=-1)  # [B, K, G, W]
    d_k, d_v, d_qs = jnp.zeros_like(k), jnp.zeros_like(v), []
    for c in range(width // chunk):
        start = c * chunk
        q_c, q_meta = q[:, start : start + chunk], tuple(x[:, start : start + chunk] for x in meta)
        do_c, delta_c, lse_c = (_columns(x, start, chunk, axis=3) for x in (d_out, delta, lse))

        def visit(j, carry, q_c=q_c, q_meta=q_meta, do_c=do_c, delta_c=delta_c, lse_c=lse_c):
            d_q, d_k, d_v = carry
            k_j, v_j = _columns(k, j * chunk, chunk), _columns(v, j * chunk, chunk)
            k_meta = tuple(_columns(x, j * chunk, chunk) for x in meta)
            probs = jnp.exp(_block_scores(q_c, k_j, q_meta, k_meta, window) - lse_c[..., None])
            d_probs = jnp.einsum("bkgtd,bskd->bkgts", do_c, v_j)
            d_scores = probs * (d_probs - delta_c[..., None]) * q_c.shape[-1] ** -0.5
            add = lambda total, x: jax.lax.dynamic_update_slice_in_dim(
                total, _columns(total, j * chunk, chunk) + x, j * chunk, 1
            )
            d_k = add(d_k, jnp.einsum("bkgts,btkgd->bskd", d_scores, q_c))
            d_v = add(d_v, jnp.einsum("bkgts,bkgtd->bskd", probs, do_c))
            return d_q + jnp.einsum("bkgts,bskd->btkgd", d_scores, k_j), d_k, d_v

        d_q, d_k, d_v = jax.lax.fori_loop(first_chunks[c], c + 1, visit, (jnp.zeros_like(q_c), d_k, d_v))
        d_qs.append(d_q)
    return jnp.concatenate(d_qs, axis=1), d_k, d_v


# A decode cache of at least this many slots is read in chunks of DECODE_CHUNK_SLOTS up to the slots
# filled so far, not whole: a step's attention then costs its position, not the longest completion's.
# Measured on the small RL-bench model (16 rows, 4 layers): a decode step over a 2063-slot cache read
# whole took 39 ms against 12 ms over 64 slots.
DECODE_CHUNKED_MIN_SLOTS = 512
DECODE_CHUNK_SLOTS = 128


def _cached_scores(q_bkgd, k_bskd, mask_bs):
    """Scaled scores [B, S, K, G] of each row's query heads against S cached keys, masked: one matrix
    product per row, [S x K, D] x [D, K x G], whose off-diagonal kv-head blocks are dropped (K times
    the useful work: on CPU 1.5x (S = 527) to 4x (S = 2063) faster than reducing over the cache, and
    XLA:CPU's per-head [S, D] x [D, G] products are slower still)."""
    b, s, kv, d = k_bskd.shape
    g = q_bkgd.shape[2]
    keys = k_bskd.astype(jnp.float32).reshape(b, s * kv, d)
    all_blocks = jnp.einsum("bnd,bde->bne", keys, jnp.moveaxis(q_bkgd, 3, 1).reshape(b, d, kv * g))
    all_blocks = all_blocks.reshape(b, s, kv, kv, g)
    scores = jnp.stack([all_blocks[:, :, i, i] for i in range(kv)], axis=2) * d**-0.5
    return jnp.where(mask_bs[:, :, None, None], scores, MASK_VALUE)


def _weighted_values(weights_bskg, v_bskd):
    """[B, K, G, D] = sum over slots of weights x values, per kv head: one product per row,
    [K x G, S x K] (block diagonal) x [S x K, D]."""
    b, s, kv, d = v_bskd.shape
    g = weights_bskg.shape[-1]
    block_diagonal = jnp.einsum("bskg,kl->bkgsl", weights_bskg, jnp.eye(kv, dtype=jnp.float32))
    values = v_bskd.astype(jnp.float32).reshape(b, s * kv, d)
    out = jnp.einsum("bmn,bnd->bmd", block_diagonal.reshape(b, kv * g, s * kv), values)
    return out.reshape(b, kv, g, d)


def one_token_attention(
    q_bhd, k_bkd, v_bkd, cached_k_bskd, cached_v_bskd, cached_mask_bs, new_valid_b, filled_slots=None
):
    """Attention of one new token per row over S cached slots and its own key: [B, H, D] (fp32 math).

    The cached slots hold the keys and values of earlier steps (cached_mask_bs says which are visible);
    the new token's key and value come apart, visible to itself where new_valid_b. filled_slots (a
    traced scalar): no slot at or past it is visible; with a cache of at least
    DECODE_CHUNKED_MIN_SLOTS slots only the chunks below it are read, merged by an online softmax.
    """
    b, s, kv, d = cached_k_bskd.shape
    g = q_bhd.shape[1] // kv
    q_bkgd = q_bhd.reshape(b, kv, g, d).astype(jnp.float32)
    own = jnp.sum(q_bkgd * k_bkd.astype(jnp.float32)[:, :, None, :], axis=-1) * d**-0.5  # [B, K, G]
    own = jnp.where(new_valid_b[:, None, None], own, MASK_VALUE)
    own_value = v_bkd.astype(jnp.float32)[:, :, None, :]
    if filled_slots is None or s < DECODE_CHUNKED_MIN_SLOTS:
        cached = _cached_scores(q_bkgd, cached_k_bskd, cached_mask_bs)
        top = jnp.maximum(jnp.max(cached, axis=1), own)
        cached_weights = jnp.exp(cached - top[:, None])
        own_weight = jnp.exp(own - top)
        total = jnp.sum(cached_weights, axis=1) + own_weight
        out = _weighted_values(cached_weights, cached_v_bskd) + own_weight[..., None] * own_value
        return (out / total[..., None]).reshape(b, kv * g, d)

    chunk = DECODE_CHUNK_SLOTS

    def one_chunk(j, carry):
        top, total, out = carry
        # The last chunk may be clamped back into the cache: its slots below j * chunk were read.
        start = jnp.minimum(j * chunk, s - chunk)
        slot_s = start + jnp.arange(chunk)
        mask = jax.lax.dynamic_slice_in_dim(cached_mask_bs, start, chunk, axis=1) & (slot_s >= j * chunk)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
        scores = _cached_scores(q_bkgd, take(cached_k_bskd), mask)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        rescale = jnp.exp(top - new_top)
        weights = jnp.exp(scores - new_top[:, None])
        total = total * rescale + jnp.sum(weights, axis=1)
        out = out * rescale[..., None] + _weighted_values(weights, take(cached_v_bskd))
        return new_top, total, out

    chunks = -(-jnp.minimum(filled_slots, s) // chunk)
    start = (own, jnp.ones_like(own), jnp.broadcast_to(own_value, (b, kv, g, d)))
    _, total, out = jax.lax.fori_loop(0, chunks, one_chunk, start)
    return (out / total[..., None]).reshape(b, kv * g, d)
