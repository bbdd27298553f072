"""Building blocks of the decoder: RMSNorm, rotary embeddings, GQA attention with a KV cache, SwiGLU MLP.
The attention math itself (masks, chunked and flash self-attention, decode) is in attention.py.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); sharding.py maps those names to
mesh axes. Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gspo_jax import sharding
from gspo_jax.models.attention import (
    attention_mask,
    causal_self_attention,
    grouped_attention,
    one_token_attention,
)
from gspo_jax.models.matmul import einsum


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

    def take_rows(self, rows_r) -> KVCache:
        """The cache of rows rows_r [R] (int32 indices into the batch), in that order."""
        buffers = lambda x: jnp.take(x, rows_r, axis=1 if self.stacked else 0)
        return KVCache(
            k=jax.tree.map(buffers, self.k),
            v=jax.tree.map(buffers, self.v),
            valid=self.valid[rows_r],
            pos=self.pos[rows_r],
        )

    def repeat_rows(self, n: int) -> KVCache:
        """Each batch row n times in a row (row b becomes rows b*n .. b*n + n - 1)."""
        buffers = lambda x: jnp.repeat(x, n, axis=1 if self.stacked else 0)
        return KVCache(
            k=jax.tree.map(buffers, self.k),
            v=jax.tree.map(buffers, self.v),
            valid=jnp.repeat(self.valid, n, axis=0),
            pos=jnp.repeat(self.pos, n, axis=0),
        )


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
        writes the new key and value at slot cache_start. Returns ([B, 1, heads, D], cache). Callers
        fill the cache in slot order, so no slot past cache_start holds anything yet."""
        cached_k, cached_v = (x.astype(self.dtype) for x in cache.layer_kv(layer))
        earlier = cache.valid & (jnp.arange(cache.valid.shape[1]) != cache_start)
        mask_bs = attention_mask(pos_bt, cache.pos, earlier, self.window)[:, 0]
        out = one_token_attention(
            q[:, 0], k[:, 0], v[:, 0], cached_k, cached_v, mask_bs, valid_bt[:, 0], filled_slots=cache_start
        )
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
