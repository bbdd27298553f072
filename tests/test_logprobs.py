"""gspo_jax.logprobs: chunked token log-probs against the full log-softmax and numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from gspo_jax.logprobs import token_logprobs_from_hidden

QWEN_VOCAB = 151_936


def make_inputs(seed, B, T, D, V, dtype=jnp.float32):
    k_h, k_w, k_y = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k_h, (B, T, D), dtype)
    lm_head = (jax.random.normal(k_w, (D, V)) / np.sqrt(D)).astype(dtype)
    targets = jax.random.randint(k_y, (B, T), 0, V)
    return hidden, lm_head, targets


def naive_logprobs(hidden, lm_head, targets, temperature):
    """The whole [B, T, V] log-softmax at once."""
    logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), lm_head.astype(jnp.float32))
    logp_btv = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_btv, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
    return logp, entropy


def test_matches_log_softmax_with_temperature_and_ragged_chunks():
    hidden, lm_head, targets = make_inputs(0, B=3, T=13, D=16, V=40)
    logp = token_logprobs_from_hidden(hidden, lm_head, targets, temperature=0.7, chunk_size=4)
    want, _ = naive_logprobs(hidden, lm_head, targets, 0.7)
    assert logp.shape == (3, 13) and logp.dtype == jnp.float32
    np.testing.assert_allclose(logp, want, atol=1e-5)


def test_matches_log_softmax_on_the_full_qwen_vocabulary():
    hidden, lm_head, targets = make_inputs(1, B=2, T=3, D=16, V=QWEN_VOCAB)
    logp = token_logprobs_from_hidden(hidden, lm_head, targets, temperature=0.9, chunk_size=2)
    want, _ = naive_logprobs(hidden, lm_head, targets, 0.9)
    np.testing.assert_allclose(logp, want, atol=1e-5)


def test_entropy_matches_numpy():
    hidden, lm_head, targets = make_inputs(2, B=2, T=7, D=8, V=30)
    logp, entropy = token_logprobs_from_hidden(
        hidden, lm_head, targets, temperature=1.3, chunk_size=3, with_entropy=True
    )
    z = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), np.asarray(lm_head, np.float64))
    z = z / 1.3
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(entropy, -(p * np.log(p)).sum(axis=-1), atol=1e-5)
    want_logp = np.log(np.take_along_axis(p, np.asarray(targets)[..., None], axis=-1)[..., 0])
    np.testing.assert_allclose(logp, want_logp, atol=1e-5)


def test_gradients_match_the_naive_version():
    hidden, lm_head, targets = make_inputs(3, B=2, T=11, D=8, V=24)
    weights = jax.random.normal(jax.random.key(4), (2, 2, 11))

    def objective(logp_entropy):
        return jnp.sum(weights[0] * logp_entropy[0] + weights[1] * logp_entropy[1])

    def chunked(h, w):
        return objective(
            token_logprobs_from_hidden(h, w, targets, temperature=0.8, chunk_size=4, with_entropy=True)
        )

    def naive(h, w):
        return objective(naive_logprobs(h, w, targets, 0.8))

    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, lm_head)
    want = jax.jit(jax.grad(naive, argnums=(0, 1)))(hidden, lm_head)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_give_fp32_logprobs_of_the_bf16_values():
    hidden, lm_head, targets = make_inputs(5, B=2, T=6, D=16, V=50, dtype=jnp.bfloat16)
    logp = token_logprobs_from_hidden(hidden, lm_head, targets, chunk_size=4)
    want, _ = naive_logprobs(hidden, lm_head, targets, 1.0)  # fp32 math on the same bf16 values
    assert logp.dtype == jnp.float32
    np.testing.assert_allclose(logp, want, atol=1e-5)
    grad = jax.jit(jax.grad(lambda h: token_logprobs_from_hidden(h, lm_head, targets, chunk_size=4).sum()))(
        hidden
    )
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


def _avals(jaxpr):
    """Every intermediate aval of a jaxpr, including those of nested jaxprs (scan, remat)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    yield from _avals(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    yield from _avals(sub)


def test_forward_and_backward_never_hold_all_logits():
    B, T, D, V, chunk = 2, 32, 8, 64, 8
    hidden, lm_head, targets = make_inputs(6, B=B, T=T, D=D, V=V)

    def loss(h, w):
        logp, entropy = token_logprobs_from_hidden(h, w, targets, chunk_size=chunk, with_entropy=True)
        return logp.sum() + entropy.sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, lm_head).jaxpr
    largest = max(int(np.prod(a.shape)) for a in _avals(jaxpr) if hasattr(a, "shape"))
    # One chunk's logits are B * chunk * V; all logits (or W stacked per chunk) would be 4x that.
    assert largest == B * chunk * V


def test_out_of_range_targets_stay_finite_under_jit():
    hidden, lm_head, targets = make_inputs(7, B=2, T=5, D=8, V=20)
    targets = targets.at[:, -2:].set(-100)
    fn = jax.jit(lambda h, w, y: token_logprobs_from_hidden(h, w, y, chunk_size=2))
    logp = fn(hidden, lm_head, targets)
    want, _ = naive_logprobs(hidden, lm_head, targets, 1.0)
    assert np.all(np.isfinite(logp))
    np.testing.assert_allclose(logp[:, :3], want[:, :3], atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    hidden, lm_head, targets = make_inputs(8, B=2, T=5, D=8, V=20)
    with pytest.raises(ValueError, match="embedding.T"):
        token_logprobs_from_hidden(hidden, lm_head.T, targets)
    with pytest.raises(ValueError, match="integer ids"):
        token_logprobs_from_hidden(hidden, lm_head, targets.astype(jnp.float32))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_from_hidden(hidden, lm_head, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_from_hidden(hidden, lm_head, targets, temperature=0.0)
