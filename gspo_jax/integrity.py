"""Per-array checksums of a state pytree, keyed by leaf path.

Orbax does not notice garbage bytes inside an array file, so checkpoint.py stores these sums next
to the arrays and compares them after a restore. Leaf paths ("opt/0/mu/w") name the same leaf in
a namedtuple state and in Orbax's restored dict, so both sides of the comparison agree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_path(keypath: tuple) -> str:
    """Path of a pytree leaf, e.g. "opt/0/mu/w"; the same for a namedtuple and Orbax's dict."""
    return "/".join(_key_name(e) for e in keypath)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """{leaf path: leaf} for every leaf of `tree`."""
    return {leaf_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _as_words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (8-byte dtypes give a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.stack([_as_words(x.real), _as_words(x.imag)])
    size = x.dtype.itemsize
    if size < 4:
        return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: spreads every input bit over the word."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """[2] uint32: order-sensitive sums mod 2^32 (exact in any reduction order, any sharding)."""
    words = _as_words(jnp.asarray(x))
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    weighted = jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum(_mix(words ^ _mix(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([weighted, mixed])


_leaf_checksum_jit = jax.jit(_leaf_checksum)


def state_checksums(state: Any) -> dict[str, list[int]]:
    """{leaf path: [two uint32 checksums]} for every array leaf of `state` (no typed keys).

    One jitted call per leaf (leaves may live on different devices).
    """
    flat = {k: v for k, v in leaves_by_path(state).items() if hasattr(v, "dtype")}
    # One leaf at a time, each finished before the next starts: many small collective programs in
    # flight at once can deadlock XLA:CPU's rendezvous when simulated devices outnumber its threads.
    outs = [jax.block_until_ready(_leaf_checksum_jit(leaf)) for leaf in flat.values()]
    # Each result is replicated: this process's shard holds all of it, also multi-host.
    sums = jax.device_get([out.addressable_data(0) for out in outs])
    return {k: [int(a), int(b)] for k, (a, b) in zip(flat, sums)}
