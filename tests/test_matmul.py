"""models/matmul.einsum: bf16 products accumulate in fp32 forward and backward, and match float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gspo_jax.models.matmul import einsum

# The model's products: attention projections in and out, the dense/shared MLP on [B, T, D] and
# [T, D] rows, batched experts on padded buffers.
CASES = [
    ("btd,dhk->bthk", (2, 3, 8), (8, 4, 5)),
    ("bthk,hkd->btd", (2, 3, 4, 5), (4, 5, 8)),
    ("...d,di->...i", (2, 3, 8), (8, 6)),
    ("...d,di->...i", (7, 8), (8, 6)),
    ("ecd,edi->eci", (3, 4, 8), (3, 8, 6)),
]


@pytest.mark.parametrize("spec,a_shape,b_shape", CASES)
def test_bf16_einsum_and_its_gradients_match_float64(spec, a_shape, b_shape):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
    out_shape = np.einsum(spec, a, b).shape
    g = rng.normal(size=out_shape)
    bf16 = lambda v: jnp.asarray(v, jnp.bfloat16)

    def loss(a, b):
        return jnp.sum(einsum(spec, a, b).astype(jnp.float32) * g)

    out = einsum(spec, bf16(a), bf16(b))
    da, db = jax.grad(loss, argnums=(0, 1))(bf16(a), bf16(b))
    assert out.dtype == da.dtype == db.dtype == jnp.bfloat16
    # Inputs rounded to bf16 first, so the comparison measures only the products' own error.
    a64, b64 = (np.asarray(bf16(v), np.float64) for v in (a, b))
    # numpy cannot sum an ellipsis away: spell its dimensions out
    spec = spec.replace("...", "pqr"[: len(a_shape) - len(spec.split(",")[0].replace("...", ""))])
    want = [np.einsum(spec, a64, b64)]
    inputs, out_spec = spec.split("->")
    lhs, rhs = inputs.split(",")
    want.append(np.einsum(f"{out_spec},{rhs}->{lhs}", g, b64))
    want.append(np.einsum(f"{lhs},{out_spec}->{rhs}", a64, g))
    for got, expected in zip((out, da, db), want):
        # one bf16 rounding of an fp32-accumulated sum: relative error <= 2^-8 of the largest value
        np.testing.assert_allclose(
            np.asarray(got, np.float64), expected, rtol=0, atol=8e-3 * np.abs(expected).max()
        )


def test_bf16_products_take_bf16_operands_and_accumulate_in_fp32_forward_and_backward():
    """Every product in the gradient's program multiplies bf16 by bf16 into fp32: JAX's own transpose
    of an fp32-accumulating product would multiply fp32 cotangents by bf16 operands (slow kernels on
    XLA:CPU: 193 vs 810 GFLOP/s at 2048^3 on this project's CPU)."""
    a = jnp.ones((4, 16, 32), jnp.bfloat16)
    b = jnp.ones((32, 8), jnp.bfloat16)
    loss = lambda a, b: jnp.sum(einsum("btd,di->bti", a, b).astype(jnp.float32) ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, b).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 3  # forward, and one per operand's cotangent
    for line in dots:
        operand_types, result_type = line.rsplit(":", 1)[1].split("->")
        assert operand_types.count("bf16") == 2 and "f32" not in operand_types, line
        assert "f32" in result_type, line


def test_fp32_einsum_is_plain_einsum():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    text = jax.jit(lambda a, b: einsum("ij,jk->ik", a, b)).lower(a, b).as_text()
    assert text == jax.jit(lambda a, b: jnp.einsum("ij,jk->ik", a, b)).lower(a, b).as_text()


def test_an_index_summed_over_one_operand_alone_is_refused():
    a, b = jnp.ones((3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
    with pytest.raises(ValueError, match="one operand alone"):
        jax.grad(lambda a: jnp.sum(einsum("ij,jk->k", a, b).astype(jnp.float32)))(a)
