"""Tests for gspo_jax.integrity: per-array checksums against a numpy formula written here."""

import jax.numpy as jnp
import numpy as np

from gspo_jax.integrity import state_checksums


def _np_mix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _np_checksum(words):
    words = words.astype(np.uint32).reshape(-1)
    index = np.arange(words.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        weighted = np.sum(words.astype(np.uint64) * (2 * index.astype(np.uint64) + 1)) % 2**32
        mixed = np.sum(_np_mix(words ^ _np_mix(index + np.uint32(0x9E3779B9))).astype(np.uint64))
    return [int(weighted), int(mixed % 2**32)]


def test_checksums_match_numpy_formula_and_see_one_flipped_bit():
    f32 = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    bf16 = jnp.asarray(f32).astype(jnp.bfloat16)
    i8 = np.arange(-5, 6, dtype=np.int8)
    flags = np.array([True, False, True])
    got = state_checksums(
        {"f32": jnp.asarray(f32), "bf16": bf16, "i8": jnp.asarray(i8), "flags": jnp.asarray(flags)}
    )
    assert got["f32"] == _np_checksum(f32.view(np.uint32))
    assert got["bf16"] == _np_checksum(np.asarray(bf16).view(np.uint16))
    assert got["i8"] == _np_checksum(i8.view(np.uint8))
    assert got["flags"] == _np_checksum(flags)
    flipped = f32.copy().view(np.uint32)
    flipped[3, 2] ^= 1
    assert state_checksums({"f32": jnp.asarray(flipped.view(np.float32))})["f32"] != got["f32"]
    swapped = f32[::-1].copy()
    assert state_checksums({"f32": jnp.asarray(swapped)})["f32"] != got["f32"]
