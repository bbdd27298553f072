"""Building blocks of the decoder: RMSNorm, rotary embeddings, GQA attention with a KV cache, SwiGLU MLP.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); sharding.py maps those names to
mesh axes. Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gspo_jax import sharding
from gspo_jax.models.matmul import einsum

# Masked attention logits use a large finite negative so fully-masked rows (left padding) stay finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def param(rngs: nnx.Rngs | None, init, shape, dtype, logical_axes) -> nnx.Param:
    """A parameter with its logical axis names; `init` is a jax.nn.initializers function."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical_axes {logical_axes} do not match shape {shape}")
    value = init(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to the input dtype, then times weight (HF order)."""

    def __init__(self, size: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, jax.nn.initializers.ones, (size,), param_dtype, ("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # The product of two values already rounded to x's dtype, taken in fp32 and rounded once, is
        # exactly HF's product in that dtype; the weight's gradient is then summed over tokens in fp32
        # (a bf16 sum became a reduce-window tree on XLA:CPU: 430 ms of the bf16 medium gradient).
        as_x = lambda v: v.astype(x.dtype).astype(jnp.float32)
        return (as_x(self.weight.value) * as_x(normed)).astype(x.dtype)


@jax.custom_vjp
def add_bias(y, bias):
    """y + bias (broadcast over y's leading axes) in y's dtype, as HF adds it; the bias's gradient is
    summed over the leading axes in fp32 (JAX's own transpose sums in y's dtype: a bf16 sum over every
    token)."""
    return y + bias.astype(y.dtype)


def _add_bias_forward(y, bias):
    return add_bias(y, bias), bias


def _add_bias_backward(bias, dy):
    leading = tuple(range(dy.ndim - bias.ndim))
    return dy, jnp.sum(dy.astype(jnp.float32), axis=leading).astype(bias.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def rope_cos_sin(positions_bt, head_dim: int, theta: float):
    """cos, sin of shape [B, T, head_dim/2] in fp32 for integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthd, cos_bth, sin_bth):
    """Rotate-half RoPE (HF convention: pairs are (i, i + d/2), not interleaved)."""
    half = x_bthd.shape[-1] // 2
    x1, x2 = x_bthd[..., :half], x_bthd[..., half:]
    cos = cos_bth[:, :, None, :].astype(x_bthd.dtype)
    sin = sin_bth[:, :, None, :].astype(x_bthd.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Every layer's preallocated cache; slot s of row b holds position pos[b, s].

    k, v: a tuple of L buffers [B, S, kv_heads, head_dim] (layers run unrolled: each writes its own
    buffer in place and attention reads it where it lies) or one stacked [L, B, S, kv_heads, head_dim]
    array (layers run as a scan that carries it; XLA:CPU copies a layer's slice at every step).
    valid: [B, S] bool (slot written with a real token); pos: [B, S] int32 token position of each
    slot. All layers write the same slots, so valid and pos are shared (causal and window masks).
    """

    k: jax.Array | tuple
    v: jax.Array | tuple
    valid: jax.Array
    pos: jax.Array

    @classmethod
    def zeros(
        cls, layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype, *, stacked: bool
    ) -> KVCache:
        shape = (batch, slots, kv_heads, head_dim)
        if stacked:
            buffers = lambda: jnp.zeros((layers, *shape), dtype)
        else:
            buffers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(layers))
        return cls(
            k=buffers(),
            v=buffers(),
            valid=jnp.zeros((batch, slots), bool),
            pos=jnp.zeros((batch, slots), jnp.int32),
        )

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    def write_slots(self, start, valid_bt, pos_bt) -> KVCache:
        """Marks slots [start, start + T) as holding this call's tokens (start is a traced scalar)."""
        return dataclasses.replace(
            self,
            valid=jax.lax.dynamic_update_slice(self.valid, valid_bt, (0, start)),
            pos=jax.lax.dynamic_update_slice(self.pos, pos_bt.astype(jnp.int32), (0, start)),
        )

    def write_layer(self, layer, start, k_bthd, v_bthd) -> KVCache:
        """Writes `layer`'s T new keys and values at slots [start, start + T) (start traced; layer a
        Python int for per-layer buffers, possibly traced for a stack)."""

        def write(buffers, new_bthd):
            if self.stacked:
                at = (layer, 0, start, 0, 0)
                return jax.lax.dynamic_update_slice(buffers, new_bthd[None].astype(buffers.dtype), at)
            updated = jax.lax.dynamic_update_slice(
                buffers[layer], new_bthd.astype(buffers[layer].dtype), (0, start, 0, 0)
            )
            return buffers[:layer] + (updated,) + buffers[layer + 1 :]

        return dataclasses.replace(self, k=write(self.k, k_bthd), v=write(self.v, v_bthd))

    def layer_kv(self, layer):
        """`layer`'s keys and values, [B, S, kv_heads, head_dim] each."""
        if self.stacked:
            take = lambda x: jax.lax.dynamic_index_in_dim(x, layer, axis=0, keepdims=False)
            return take(self.k), take(self.v)
        return self.k[layer], self.v[layer]

    def repeat_rows(self, n: int) -> KVCache:
        """Each batch row n times in a row (row b becomes rows b*n .. b*n + n - 1)."""
        buffers = lambda x: jnp.repeat(x, n, axis=1 if self.stacked else 0)
        return KVCache(
            k=jax.tree.map(buffers, self.k),
            v=jax.tree.map(buffers, self.v),
            valid=jnp.repeat(self.valid, n, axis=0),
            pos=jnp.repeat(self.pos, n, axis=0),
        )


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
    """Softmax attention in fp32 with grouped query heads (q head h uses kv head h // group)."""
    b, t, heads, d = q_bthd.shape
    kv_heads = k_bshd.shape[2]
    q = q_bthd.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bshd, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, _MASK_VALUE)
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
    Packed rows of PACKED_FLASH_MIN_COLUMNS or more on CPU take _packed_flash_attention, which also
    skips the key chunks outside each query chunk's segments.
    """
    t = q_bthd.shape[1]
    if not chunk or t <= chunk:
        mask = attention_mask(pos_bt, pos_bt, valid_bt, window, segments_bt, segments_bt)
        return grouped_attention(q_bthd, k_bthd, v_bthd, mask)

    if segments_bt is not None and t >= PACKED_FLASH_MIN_COLUMNS and jax.default_backend() == "cpu":
        flash = _packed_flash_attention(window, chunk)
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


# Packed rows at least this wide train through _packed_flash_attention on CPU. Measured forward +
# backward per row (segments of 185 tokens): 15.3 vs 10.4 ms at 520 columns, 23 vs 38 ms at 1040,
# 41 vs 118 ms at 2063.
PACKED_FLASH_MIN_COLUMNS = 768


def _pad_columns(x, width, value=0):
    return jnp.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)


@functools.cache
def _packed_flash_attention(window: int | None, chunk: int):
    """Attention over packed rows with its own VJP: f(q, k, v, pos, valid, segments) -> [B, T, H, D] fp32.

    Query chunk c attends only to key chunks j0(c) .. c. Valid segment ids are non-decreasing along a
    packed row, so the keys a chunk can see form one range, starting at the first key of the least
    segment among its valid queries (over rows). Each chunk's keys are visited in a fori_loop with an
    online softmax; the forward keeps the output and log-sum-exp per query, and the backward
    recomputes each block's probabilities (flash attention's recurrences). Rows of many short
    sequences skip most of the [T, T] blocks that the masked chunked path computes.
    """
    scale_of = lambda d: d**-0.5

    def first_key_chunk(seg, valid, start, end):
        queries = jnp.where(valid[:, start:end], seg[:, start:end], jnp.iinfo(jnp.int32).max)
        least = jnp.min(queries, axis=1)  # [B]; a row without valid queries looks at no key
        first = jnp.argmax(valid & (seg >= least[:, None]), axis=1)
        has_any = jnp.any(valid & (seg >= least[:, None]), axis=1)
        return jnp.min(jnp.where(has_any, first, seg.shape[1])) // chunk

    def key_block(x, j):
        return jax.lax.dynamic_slice_in_dim(x, j * chunk, chunk, axis=1)

    def prepared(q, k, v, pos, valid, seg):
        b, t, heads, d = q.shape
        kv_heads = k.shape[2]
        width = -(-t // chunk) * chunk
        f32 = lambda x: _pad_columns(x.astype(jnp.float32), width)
        q = f32(q).reshape(b, width, kv_heads, heads // kv_heads, d)
        padded = (_pad_columns(pos, width), _pad_columns(valid, width, False), _pad_columns(seg, width))
        return q, f32(k), f32(v), padded

    def block_scores(q_c, k_j, q_meta, k_meta):
        scores = jnp.einsum("btkgd,bskd->bkgts", q_c, k_j) * scale_of(q_c.shape[-1])
        mask = attention_mask(q_meta[0], k_meta[0], k_meta[1], window, q_meta[2], k_meta[2])
        return jnp.where(mask[:, None, None], scores, _MASK_VALUE)

    def chunk_meta(meta, start):
        return tuple(x[:, start : start + chunk] for x in meta)

    def forward(q, k, v, pos, valid, seg):
        t = q.shape[1]
        q, k, v, meta = prepared(q, k, v, pos, valid, seg)
        b, width, kv_heads, g, d = q.shape
        outs, lses = [], []
        for c in range(width // chunk):
            start = c * chunk
            q_c, q_meta = q[:, start : start + chunk], chunk_meta(meta, start)

            def visit(j, carry, q_c=q_c, q_meta=q_meta):
                top, total, acc = carry
                k_meta = tuple(key_block(x, j) for x in meta)
                scores = block_scores(q_c, key_block(k, j), q_meta, k_meta)
                new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
                rescale = jnp.exp(top - new_top)
                weights = jnp.exp(scores - new_top[..., None])
                values = jnp.einsum("bkgts,bskd->bkgtd", weights, key_block(v, j))
                return new_top, total * rescale + jnp.sum(weights, -1), acc * rescale[..., None] + values

            rows = (b, kv_heads, g, chunk)
            init = (jnp.full(rows, _MASK_VALUE), jnp.zeros(rows), jnp.zeros((*rows, d)))
            top, total, acc = jax.lax.fori_loop(
                first_key_chunk(meta[2], meta[1], start, start + chunk), c + 1, visit, init
            )
            total = jnp.where(total > 0, total, 1.0)  # no key visited: padding queries, output 0
            outs.append(acc / total[..., None])
            lses.append(top + jnp.log(total))
        out = jnp.concatenate(outs, axis=3)  # [B, K, G, W, D]
        lse = jnp.concatenate(lses, axis=3)  # [B, K, G, W]
        result = jnp.moveaxis(out, 3, 1).reshape(b, width, kv_heads * g, d)[:, :t]
        return result, (out, lse)

    @jax.custom_vjp
    def attention(q, k, v, pos, valid, seg):
        return forward(q, k, v, pos, valid, seg)[0]

    def attention_fwd(q, k, v, pos, valid, seg):
        result, (out, lse) = forward(q, k, v, pos, valid, seg)
        return result, (q, k, v, pos, valid, seg, out, lse)

    def attention_bwd(saved, d_result):
        q0, k0, v0, pos, valid, seg, out, lse = saved
        t = q0.shape[1]
        q, k, v, meta = prepared(q0, k0, v0, pos, valid, seg)
        b, width, kv_heads, g, d = q.shape
        d_out = jnp.moveaxis(_pad_columns(d_result.astype(jnp.float32), width).reshape(q.shape), 1, 3)
        delta = jnp.sum(d_out * out, axis=-1)  # [B, K, G, W]
        d_k, d_v, d_qs = jnp.zeros_like(k), jnp.zeros_like(v), []
        for c in range(width // chunk):
            start = c * chunk
            q_c, q_meta = q[:, start : start + chunk], chunk_meta(meta, start)
            cols = slice(start, start + chunk)
            do_c, delta_c, lse_c = d_out[:, :, :, cols], delta[:, :, :, cols], lse[:, :, :, cols]

            def visit(j, carry, q_c=q_c, q_meta=q_meta, do_c=do_c, delta_c=delta_c, lse_c=lse_c):
                d_q, d_k, d_v = carry
                k_j, v_j = key_block(k, j), key_block(v, j)
                probs = jnp.exp(
                    block_scores(q_c, k_j, q_meta, tuple(key_block(x, j) for x in meta)) - lse_c[..., None]
                )
                d_probs = jnp.einsum("bkgtd,bskd->bkgts", do_c, v_j)
                d_scores = probs * (d_probs - delta_c[..., None]) * scale_of(d)
                add = lambda total, x: jax.lax.dynamic_update_slice_in_dim(
                    total, key_block(total, j) + x, j * chunk, 1
                )
                d_k = add(d_k, jnp.einsum("bkgts,btkgd->bskd", d_scores, q_c))
                d_v = add(d_v, jnp.einsum("bkgts,bkgtd->bskd", probs, do_c))
                return d_q + jnp.einsum("bkgts,bskd->btkgd", d_scores, k_j), d_k, d_v

            start_j = first_key_chunk(meta[2], meta[1], start, start + chunk)
            d_q, d_k, d_v = jax.lax.fori_loop(start_j, c + 1, visit, (jnp.zeros_like(q_c), d_k, d_v))
            d_qs.append(d_q)
        d_q = jnp.concatenate(d_qs, axis=1).reshape(b, width, kv_heads * g, d)[:, :t]
        no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
        return (
            d_q.astype(q0.dtype),
            d_k[:, :t].astype(k0.dtype),
            d_v[:, :t].astype(v0.dtype),
            no_grad(pos),
            no_grad(valid),
            no_grad(seg),
        )

    attention.defvjp(attention_fwd, attention_bwd)
    return attention


def one_token_attention(q_bhd, k_bkd, v_bkd, cached_k_bskd, cached_v_bskd, cached_mask_bs, new_valid_b):
    """Attention of one new token per row over S cached slots and its own key: [B, heads, D] (fp32 math).

    The cached slots hold the keys and values of earlier steps (cached_mask_bs says which are visible);
    the new token's key and value come apart, visible to itself where new_valid_b. Both cache
    products are one matrix product per row, [S x K, D] x [D, K x G] for the scores and
    [K x G, S x K] x [S x K, D] for the output, whose off-diagonal kv-head blocks are wasted (K times
    the useful work): on CPU this runs 1.5x (S = 527) to 4x (S = 2063) faster than reducing over the
    cache, and XLA:CPU's per-head [S, D] x [D, G] products are slower still.
    """
    b, s, kv, d = cached_k_bskd.shape
    g = q_bhd.shape[1] // kv
    scale = d**-0.5
    q_bkgd = q_bhd.reshape(b, kv, g, d).astype(jnp.float32)
    keys = cached_k_bskd.astype(jnp.float32).reshape(b, s * kv, d)
    all_blocks = jnp.einsum("bnd,bde->bne", keys, jnp.moveaxis(q_bkgd, 3, 1).reshape(b, d, kv * g))
    all_blocks = all_blocks.reshape(b, s, kv, kv, g)
    cached = jnp.stack([all_blocks[:, :, i, i] for i in range(kv)], axis=2) * scale  # [B, S, K, G]
    cached = jnp.where(cached_mask_bs[:, :, None, None], cached, _MASK_VALUE)
    own = jnp.sum(q_bkgd * k_bkd.astype(jnp.float32)[:, :, None, :], axis=-1) * scale  # [B, K, G]
    own = jnp.where(new_valid_b[:, None, None], own, _MASK_VALUE)
    top = jnp.maximum(jnp.max(cached, axis=1), own)
    cached_weights = jnp.exp(cached - top[:, None])
    own_weight = jnp.exp(own - top)
    total = jnp.sum(cached_weights, axis=1) + own_weight
    block_diagonal = jnp.einsum("bskg,kl->bkgsl", cached_weights, jnp.eye(kv, dtype=jnp.float32))
    values = cached_v_bskd.astype(jnp.float32).reshape(b, s * kv, d)
    out = jnp.einsum("bmn,bnd->bmd", block_diagonal.reshape(b, kv * g, s * kv), values).reshape(b, kv, g, d)
    out = out + own_weight[..., None] * v_bkd.astype(jnp.float32)[:, :, None, :]
    return (out / total[..., None]).reshape(b, kv * g, d)


class Attention(nnx.Module):
    """GQA self-attention: optional q/k/v(/o) biases, optional per-head q/k RMSNorm before RoPE."""

    def __init__(self, cfg, layer: int, *, rngs: nnx.Rngs):
        d, nq, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(cfg.initializer_range)
        zeros = jax.nn.initializers.zeros
        self.num_heads, self.head_dim = nq, hd
        self.rope_theta = cfg.rope_theta
        self.window = cfg.layer_window(layer)
        self.chunk = cfg.attention_chunk
        self.dtype = jnp.dtype(cfg.dtype)
        self.q_proj = param(rngs, init, (d, nq, hd), pdt, ("embed", "q_heads", "head_dim"))
        self.k_proj = param(rngs, init, (d, nkv, hd), pdt, ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(rngs, init, (d, nkv, hd), pdt, ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(rngs, init, (nq, hd, d), pdt, ("q_heads", "head_dim", "embed"))
        if cfg.has_qkv_bias:
            self.q_bias = param(rngs, zeros, (nq, hd), pdt, ("q_heads", "head_dim"))
            self.k_bias = param(rngs, zeros, (nkv, hd), pdt, ("kv_heads", "head_dim"))
            self.v_bias = param(rngs, zeros, (nkv, hd), pdt, ("kv_heads", "head_dim"))
        if cfg.attention_bias:
            self.o_bias = param(rngs, zeros, (d,), pdt, ("embed",))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)

    def _project(self, x_btd, name: str):
        w = getattr(self, f"{name}_proj").value.astype(self.dtype)
        y = einsum("btd,dhk->bthk", x_btd, w)
        if hasattr(self, f"{name}_bias"):
            y = add_bias(y, getattr(self, f"{name}_bias").value)
        return y

    def __call__(
        self,
        x_btd,
        pos_bt,
        valid_bt,
        cache: KVCache | None = None,
        cache_start=None,
        layer=None,
        segments_bt=None,
    ):
        """Returns (y [B, T, D], updated cache or None). segments_bt: packed rows' segment ids (no cache).

        Without a cache the keys are this call's own tokens. With one (whose valid / pos already
        describe this call's slots), the T new keys are written into `layer`'s slice at slots
        [cache_start, cache_start + T) and the queries attend over that layer's whole cache.
        """
        q = sharding.constrain(self._project(x_btd, "q"), ("batch", "seq", "q_heads", "head_dim"))
        k = sharding.constrain(self._project(x_btd, "k"), ("batch", "seq", "kv_heads", "head_dim"))
        v = sharding.constrain(self._project(x_btd, "v"), ("batch", "seq", "kv_heads", "head_dim"))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(pos_bt, self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = causal_self_attention(q, k, v, pos_bt, valid_bt, self.window, self.chunk, segments_bt)
        elif q.shape[1] == 1 and jax.default_backend() == "cpu":
            out, cache = self._decode_step(q, k, v, pos_bt, valid_bt, cache, cache_start, layer)
        else:
            cache = cache.write_layer(layer, cache_start, k, v)
            keys, values = (x.astype(self.dtype) for x in cache.layer_kv(layer))
            out = grouped_attention(
                q, keys, values, attention_mask(pos_bt, cache.pos, cache.valid, self.window)
            )
        out = sharding.constrain(out, ("batch", "seq", "q_heads", "head_dim"))
        y = einsum("bthk,hkd->btd", out, self.o_proj.value.astype(self.dtype))
        if hasattr(self, "o_bias"):
            y = add_bias(y, self.o_bias.value)
        return y, cache

    def _decode_step(self, q, k, v, pos_bt, valid_bt, cache, cache_start, layer):
        """A decode step on CPU (T = 1): attends over the cache as it was before this step, then
        writes the new key and value at slot cache_start. Returns ([B, 1, heads, D], cache)."""
        cached_k, cached_v = (x.astype(self.dtype) for x in cache.layer_kv(layer))
        earlier = cache.valid & (jnp.arange(cache.valid.shape[1]) != cache_start)
        mask_bs = attention_mask(pos_bt, cache.pos, earlier, self.window)[:, 0]
        out = one_token_attention(q[:, 0], k[:, 0], v[:, 0], cached_k, cached_v, mask_bs, valid_bt[:, 0])
        # The write must depend on the reads: otherwise XLA's copy insertion cannot order them before
        # the in-place update and copies every layer's cache at every step (XLA:CPU expands
        # optimization_barrier before that pass). 0 * x stays in the program for floats (NaN * 0).
        after_reads = 0.0 * out[:, None, :1, :1].astype(k.dtype)
        cache = cache.write_layer(layer, cache_start, k + after_reads, v + after_reads)
        return out[:, None].astype(self.dtype), cache


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP and Qwen2-MoE's shared expert."""

    def __init__(self, hidden: int, intermediate: int, *, param_dtype, dtype, init_std, rngs):
        init = jax.nn.initializers.normal(init_std)
        self.dtype = jnp.dtype(dtype)
        self.gate_proj = param(rngs, init, (hidden, intermediate), param_dtype, ("embed", "mlp"))
        self.up_proj = param(rngs, init, (hidden, intermediate), param_dtype, ("embed", "mlp"))
        self.down_proj = param(rngs, init, (intermediate, hidden), param_dtype, ("mlp", "embed"))

    def __call__(self, x):
        """x: [B, T, D] or [T, D] (rows split like the batch)."""
        gate = einsum("...d,di->...i", x, self.gate_proj.value.astype(self.dtype))
        up = einsum("...d,di->...i", x, self.up_proj.value.astype(self.dtype))
        hidden_axes = ("batch", "seq", "mlp") if x.ndim == 3 else ("batch", "mlp")
        hidden = sharding.constrain(jax.nn.silu(gate) * up, hidden_axes)
        return einsum("...i,id->...d", hidden, self.down_proj.value.astype(self.dtype))
