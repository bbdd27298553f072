"""Sampler vs trainer log-probs under bf16 compute (GSPO paper section 5.4): the LM head and
log-softmax are fp32 on both sides, what remains is zero-mean bf16 rounding noise, it is logged per
token and per sequence, and a gap wider than the clip is reported when the sampler's log-probs
stand in for pi_old."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import micro_config as micro
from gspo_jax import losses
from gspo_jax.models.config import PRESETS
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM
from gspo_jax.sampler import Sampler, sample_next
from gspo_jax.trainer import sampler_gap_warning
from gspo_jax.logprobs import completion_logprobs, token_logprobs_from_hidden


def tiny(dtype):
    cfg = PRESETS["tiny"].replace(dtype=dtype, param_dtype="float32", initializer_range=0.02)
    return nnx.split(QwenMoeForCausalLM(cfg, rngs=nnx.Rngs(params=0)))


def test_bf16_lm_head_accumulates_in_fp32_in_sampler_and_trainer():
    graphdef, params = tiny("bfloat16")
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(6, 128)), jnp.bfloat16)
    weight = model.lm_head_weight()
    reference = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)  # exact products of bf16
    logits = model.logits(hidden)  # eager: a bf16 matmul here would round each logit (~1e-2)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5, rtol=0)

    tokens, sampler_logp = sample_next(jax.random.key(0), logits, temperature=0.7)
    trainer_logp = token_logprobs_from_hidden(hidden[:, None], weight, tokens[:, None], temperature=0.7)
    shifted = reference / 0.7 - reference.max(-1, keepdims=True) / 0.7
    expected = shifted[np.arange(6), tokens] - np.log(np.exp(shifted).sum(-1))
    np.testing.assert_allclose(np.asarray(sampler_logp), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(trainer_logp[:, 0]), expected, atol=1e-5)


def rollout_logprobs(dtype, prompts, group, width):
    """Completion tokens [B*G, P + width] and the sampler's log-probs of one temperature-1 rollout."""
    graphdef, params = tiny(dtype)
    rollout = jax.tree.map(lambda x: x.astype(dtype), params)  # the trainer's rollout copy
    out = Sampler(graphdef, max_new_tokens=width, num_samples=group)(
        rollout, prompts, np.ones_like(prompts), jax.random.key(1)
    )
    return np.concatenate([np.repeat(prompts, group, 0), np.asarray(out.completion_ids)], 1), out.logprobs


def trainer_logprobs(dtype, tokens, width):
    graphdef, params = tiny(dtype)
    valid = np.ones(tokens.shape, bool)

    def score(p):
        return completion_logprobs(nnx.merge(graphdef, p), tokens, valid, width, temperature=1.0, chunk=256)[
            0
        ]

    return jax.jit(score)(params)


def test_bf16_sampler_trainer_gap_is_unbiased_rounding_noise():
    prompts = np.random.default_rng(0).integers(4, 64, (8, 12)).astype(np.int32)
    width = 16  # no stop ids: every row has `width` tokens
    tokens, sampler = rollout_logprobs("bfloat16", prompts, 4, width)
    sampler = np.asarray(sampler)
    trainer = np.asarray(trainer_logprobs("bfloat16", tokens, width))
    reference = np.asarray(trainer_logprobs("float32", tokens, width))  # same weights, fp32 compute
    token_gap = np.abs(sampler - trainer).mean()
    # The sampler is no further from the trainer than bf16 rounding moves the trainer from fp32
    # (measured 9.8e-4 vs 1.4e-3 per token): no precision loss of its own, such as bf16 logits.
    assert token_gap <= 1.5 * np.abs(trainer - reference).mean()
    # The per-token differences are zero-mean, so the sequence mean shrinks like 1/sqrt(length)
    # (measured 3.6e-4 = 0.77x rms / sqrt(length)); a systematic per-token bias would not shrink.
    seq_gap = np.abs((sampler - trainer).mean(axis=1)).mean()
    assert seq_gap <= 1.5 * np.sqrt(np.mean((sampler - trainer) ** 2) / width)


def test_logprob_gap_metrics_match_numpy():
    rng = np.random.default_rng(3)
    logp, sampler = rng.normal(size=(2, 5, 6))
    mask = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1] * 6, [1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]])
    got = losses.logprob_gap_metrics(jnp.asarray(logp), jnp.asarray(sampler), jnp.asarray(mask))
    diff = logp - sampler
    rows = [r for r in range(5) if mask[r].any()]
    seq = [abs(diff[r][mask[r] == 1].mean()) for r in rows]
    assert got["logprob_gap/seq_abs"] == pytest.approx(np.mean(seq), rel=1e-5)
    assert got["logprob_gap/token_abs"] == pytest.approx(np.abs(diff[mask == 1]).mean(), rel=1e-5)


@pytest.mark.parametrize(
    "old_logprobs,gap,eps,warns",
    [
        ("sampler", 5e-4, None, True),
        ("sampler", 2e-4, None, False),
        ("trainer", 1.0, None, False),
        ("sampler", 5e-4, 1e-3, False),
    ],
)
def test_sampler_gap_warning_names_the_fix(old_logprobs, gap, eps, warns):
    algo = micro.get_config().algo
    algo.update(old_logprobs=old_logprobs, importance_sampling_level="sequence", eps_low=eps, eps_high=eps)
    message = sampler_gap_warning(gap, algo)  # default widths for "sequence": 3e-4 / 4e-4
    assert (message is not None) == warns
    if warns:
        assert "exceeds the clip width 0.0003" in message and "algo.old_logprobs=trainer" in message


def test_bf16_rmsnorm_rounds_like_hf_and_sums_its_weight_gradient_in_fp32():
    """Forward: HF's bf16 product (weight and normalised input each rounded to bf16, product rounded
    once), bitwise but for the rare element whose fp32 rsqrt lands on a bf16 rounding boundary (XLA's
    vectorised and scalar rsqrt can differ in the last fp32 bit). Backward: the weight's gradient over
    4096 tokens matches float64 within one final bf16 rounding; a bf16 accumulation would not."""
    from gspo_jax.models.layers import RMSNorm

    rng = np.random.default_rng(0)
    size, tokens = 8, 4096
    norm = RMSNorm(size, 1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.weight.value = jnp.asarray(1 + 0.3 * rng.normal(size=size), jnp.float32)
    graphdef, state = nnx.split(norm)
    x = jnp.asarray(rng.normal(size=(tokens, size)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(tokens, size)), jnp.bfloat16)

    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
    hf = norm.weight.value.astype(jnp.bfloat16) * normed
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(x))(state)
    assert out.dtype == jnp.bfloat16

    differing = lambda a, b: np.mean(np.asarray(a, np.float32) != np.asarray(b, np.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(hf, np.float32), rtol=2**-7, atol=0)
    assert differing(out, hf) < 1e-3  # measured 0 or 1 element of 32768
    # The product of the unrounded normalised input, rounded once, is what the test tells apart:
    unrounded = norm.weight.value * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6))
    assert differing(unrounded.astype(jnp.bfloat16), hf) > 0.05

    grad = jax.jit(jax.grad(lambda s: jnp.sum((nnx.merge(graphdef, s)(x) * dy).astype(jnp.float32))))(state)
    want = np.sum(np.asarray(dy, np.float64) * np.asarray(normed, np.float64), axis=0)
    got = np.asarray(grad["weight"].value, np.float64)
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=0)


def test_bf16_bias_gradient_is_summed_in_fp32():
    """q/k/v/o biases (Qwen2-MoE): the forward is HF's bf16 add; the bias's gradient over 4096 tokens
    matches float64 within one final bf16 rounding (JAX's own transpose sums in bf16: several % off)."""
    from gspo_jax.models.layers import add_bias

    rng = np.random.default_rng(1)
    y = jnp.asarray(rng.normal(size=(2, 2048, 4, 8)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.bfloat16)
    out = add_bias(y, bias)
    np.testing.assert_array_equal(
        np.asarray(out, np.float32), np.asarray(y + bias.astype(jnp.bfloat16), np.float32)
    )
    grad = jax.jit(jax.grad(lambda b: jnp.sum((add_bias(y, b) * dy).astype(jnp.float32))))(bias)
    want = np.sum(np.asarray(dy, np.float64), axis=(0, 1))
    np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=2**-8, atol=0)
