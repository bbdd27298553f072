"""Two-operand einsum in the operands' dtype, accumulated in fp32 when they are bf16 / fp16 on XLA:CPU.

XLA:CPU runs a bf16 product with a bf16 result on its generic kernels, but one that accumulates into fp32
on oneDNN's (AMX / AVX512-BF16 where the CPU has them): a jitted 2048^3 product measured 193 GFLOP/s vs
810 on this project's 2-core Sapphire Rapids VM (fp32: 181). JAX differentiates such a product into
mixed fp32 x bf16 products, which fall back to the slow kernels, so the low-precision path carries its
own VJP whose two products are again bf16 x bf16 accumulated in fp32. TPU and GPU accumulate bf16
products in fp32 anyway; there, and for fp32 operands, this is plain `jnp.einsum`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def einsum(spec: str, a, b, out_dtype=None):
    """jnp.einsum(spec, a, b) with fp32 accumulation of low-precision operands on CPU; the result in
    out_dtype (default: a's dtype).

    Every index of one operand must appear in the other operand or the output (no index summed over
    one operand alone), so each operand's cotangent is again one two-operand einsum."""
    if a.dtype == jnp.float32 or a.dtype != b.dtype or jax.default_backend() != "cpu":
        return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
    if out_dtype is not None:  # no VJP needed: only the tiled dispatch's own backward asks for fp32 sums
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)
    return _accumulated_einsum(spec, a, b)


def _accumulate(spec: str, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _transposed_specs(spec: str) -> tuple[str, str]:
    """'ab,bc->ac' -> ('ac,bc->ab', 'ab,ac->bc'): the einsums giving each operand's cotangent."""
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    for operand, other in ((lhs, rhs), (rhs, lhs)):
        if set(operand) - set(other) - set(out):
            raise ValueError(f"einsum {spec!r} sums an index over one operand alone; not supported here")
    return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _accumulated_einsum(spec, a, b):
    return _accumulate(spec, a, b)


def _forward(spec, a, b):
    return _accumulate(spec, a, b), (a, b)


def _backward(spec, residuals, g):
    a, b = residuals
    spec_a, spec_b = _transposed_specs(spec)
    g = g.astype(a.dtype)
    return _accumulate(spec_a, g, b), _accumulate(spec_b, a, g).astype(b.dtype)


_accumulated_einsum.defvjp(_forward, _backward)
