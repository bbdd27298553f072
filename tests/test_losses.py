"""gspo_jax.losses against numpy references written out here from the GSPO / GRPO formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gspo_jax import losses
from gspo_jax.losses import group_advantages, policy_loss

LEVELS = ("sequence", "sequence_token", "token")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean")
SEQUENCE_LEVELS = ("sequence", "sequence_token")
CLIP_METRICS = (
    "clip_frac/seq",
    "clip_frac/seq_low",
    "clip_frac/seq_high",
    "clip_frac/token",
    "clip_frac/token_low",
    "clip_frac/token_high",
)


# ----------------------------------------------------------------------------- numpy references


def np_group_advantages(rewards, g, scale, eps=1e-6):
    r = np.asarray(rewards, np.float64).reshape(-1, g)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        denom = r.std(axis=1, ddof=1, keepdims=True) + eps
    elif scale == "batch":
        denom = r.std(ddof=1) + eps
    else:
        denom = 1.0
    equal = np.all(r == r[:, :1], axis=1)
    adv = np.where(equal[:, None], 0.0, centred / denom)
    return adv.reshape(-1), equal.mean()


def np_policy_loss(logp, old, adv, mask, level, eps_low, eps_high, aggregation, ref=None, beta=0.0):
    """GSPO / GSPO-token / GRPO objective by direct loops; returns (loss, metrics)."""
    logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
    m = np.asarray(mask) != 0
    B, T = logp.shape
    adv = np.asarray(adv, np.float64)
    adv_bt = np.broadcast_to(adv[:, None], (B, T)) if adv.ndim == 1 else adv
    term = np.zeros((B, T))
    low = np.zeros((B, T), bool)
    high = np.zeros((B, T), bool)
    ratios, abs_log_s = [], []
    for i in range(B):
        idx = np.flatnonzero(m[i])
        if idx.size == 0:
            continue
        log_s = np.sum(logp[i, idx] - old[i, idx]) / idx.size
        abs_log_s.append(abs(log_s))
        if level != "token":
            ratios.append(np.exp(log_s))
        for t in idx:
            r = np.exp(log_s) if level != "token" else np.exp(logp[i, t] - old[i, t])
            if level == "token":
                ratios.append(r)
            a = adv_bt[i, t]
            term[i, t] = min(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a)
            high[i, t] = r > 1 + eps_high and a > 0
            low[i, t] = r < 1 - eps_low and a < 0

    def seq_mean(x):
        return np.mean([x[i, m[i]].mean() for i in range(B) if m[i].any()])

    def tok_mean(x):
        return x[m].sum() / m.sum()

    agg = tok_mean if aggregation == "token-mean" else seq_mean
    x_old = np.where(m, logp - old, 0.0)
    metrics = {
        "loss/policy": -agg(term),
        "clip_frac/seq": seq_mean(low | high),
        "clip_frac/seq_low": seq_mean(low),
        "clip_frac/seq_high": seq_mean(high),
        "clip_frac/token": tok_mean(low | high),
        "clip_frac/token_low": tok_mean(low),
        "clip_frac/token_high": tok_mean(high),
        "ratio/mean": np.mean(ratios),
        "ratio/min": np.min(ratios),
        "ratio/max": np.max(ratios),
        "log_ratio_seq/abs_mean": np.mean(abs_log_s),
        "kl": tok_mean(np.exp(x_old) - x_old - 1),
    }
    loss = -agg(term)
    if ref is not None:
        x = np.where(m, np.asarray(ref, np.float64) - logp, 0.0)
        metrics["kl_ref"] = agg(np.exp(x) - x - 1)
        loss += beta * metrics["kl_ref"]
    return loss, metrics


def np_gspo_sequence_loss(logp, old, adv, mask, eps_low, eps_high, aggregation):
    """GSPO written per sequence (paper Eq. 5-7), independent of the per-token loop above."""
    m = np.asarray(mask) != 0
    n = m.sum(axis=1)
    keep = n > 0
    log_s = np.where(m, logp - old, 0.0).sum(axis=1)[keep] / n[keep]
    s, a = np.exp(log_s), np.asarray(adv)[keep]
    obj = np.minimum(s * a, np.clip(s, 1 - eps_low, 1 + eps_high) * a)
    if aggregation == "token-mean":
        return -np.sum(n[keep] * obj) / n.sum()
    return -np.mean(obj)


# ----------------------------------------------------------------------------- batches

LENGTHS = (7, 5, 3, 1, 0, 6, 2, 4)


def make_batch(seed, noise, lengths=LENGTHS, T=7, token_adv=False, garbage=1e6):
    """fp32 batch; logp is garbage wherever the mask is 0 (it must never be read)."""
    rng = np.random.default_rng(seed)
    B = len(lengths)
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    old = -rng.uniform(0.1, 3.0, (B, T))
    logp = old + rng.normal(0.0, noise, (B, T))
    logp = np.where(mask, logp, garbage)
    adv = rng.normal(size=(B, T) if token_adv else B)
    ref = old + rng.normal(0.0, 0.5, (B, T))
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return f32(logp), f32(old), f32(adv), mask, f32(ref)


# Noise per level that puts ratios on both sides of that level's default clip range.
NOISE = {"sequence": 1e-3, "sequence_token": 1e-3, "token": 0.3}
DEFAULT_EPS = {"sequence": (3e-4, 4e-4), "sequence_token": (3e-4, 4e-4), "token": (0.2, 0.28)}


def assert_metrics_close(got, want, rtol=1e-5, atol=1e-6):
    for key, value in want.items():
        np.testing.assert_allclose(float(got[key]), value, rtol=rtol, atol=atol, err_msg=key)


# ----------------------------------------------------------------------------- group advantages


@pytest.mark.parametrize("group_size", [2, 3, 8])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_numpy(group_size, scale):
    rng = np.random.default_rng(group_size)
    rewards = rng.normal(size=(5, group_size)).astype(np.float32)
    rewards[1] = 0.7  # one group with equal rewards
    if group_size > 2:
        rewards[3, 0] = rewards[3, 1]  # a tie inside a group is not "all equal"
    rewards = rewards.reshape(-1)
    adv, metrics = group_advantages(rewards, group_size, scale=scale)
    want, frac_equal = np_group_advantages(rewards, group_size, scale)
    assert adv.shape == (5 * group_size,) and adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(adv[group_size : 2 * group_size], 0.0)
    np.testing.assert_allclose(metrics["frac_reward_zero_std"], 0.2)
    assert frac_equal == 0.2
    np.testing.assert_allclose(metrics["advantage/mean"], want.mean(), atol=1e-6)
    np.testing.assert_allclose(metrics["advantage/std"], want.std(), rtol=1e-5)
    np.testing.assert_allclose(metrics["advantage/min"], want.min(), rtol=1e-5)
    np.testing.assert_allclose(metrics["advantage/max"], want.max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["reward/mean"], rewards.mean(), rtol=1e-5)


def test_group_std_is_unbiased():
    adv, _ = group_advantages(jnp.array([0.0, 1.0]), 2, eps=0.0)
    # torch-style unbiased std of {0, 1} is 1/sqrt(2): advantages are -+0.7071, not -+1.
    np.testing.assert_allclose(adv, [-np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_groups_give_exact_zeros(scale):
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (r - mean) / (std + eps) is not 0 here.
    rewards = jnp.array([0.1, 0.1, 0.1, 0.3, 0.3, 0.3], jnp.float32)
    adv, metrics = group_advantages(rewards, 3, scale=scale)
    np.testing.assert_array_equal(adv, 0.0)
    assert float(metrics["frac_reward_zero_std"]) == 1.0
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(jnp.zeros(4), 3)
    with pytest.raises(ValueError, match="flat"):
        group_advantages(jnp.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="'group', 'none'"):
        group_advantages(jnp.zeros(4), 2, scale="std")


# ----------------------------------------------------------------------------- loss values


@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", LEVELS)
def test_loss_and_metrics_match_numpy(level, aggregation, with_kl):
    logp, old, adv, mask, ref = make_batch(2, NOISE[level])
    kl_ref, beta = (ref, 0.05) if with_kl else (None, 0.0)
    loss, metrics = policy_loss(
        logp, old, adv, mask, level=level, aggregation=aggregation, ref_logp=kl_ref, beta=beta
    )
    want, want_metrics = np_policy_loss(
        logp, old, adv, mask, level, *DEFAULT_EPS[level], aggregation, ref=kl_ref, beta=beta
    )
    # The batch must exercise both branches of the clip, or the comparison proves little.
    assert 0 < want_metrics["clip_frac/token"] < 1
    assert want_metrics["clip_frac/seq_low"] > 0 and want_metrics["clip_frac/seq_high"] > 0
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics, want_metrics)
    assert ("kl_ref" in metrics) == with_kl
    if level == "sequence":
        want_seq = np_gspo_sequence_loss(
            logp.astype(np.float64), old.astype(np.float64), adv, mask, *DEFAULT_EPS[level], aggregation
        )
        np.testing.assert_allclose(float(metrics["loss/policy"]), want_seq, rtol=1e-5)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", ["sequence_token", "token"])
def test_token_level_advantages_match_numpy(level, aggregation):
    logp, old, adv_bt, mask, ref = make_batch(1, NOISE[level], token_adv=True)
    loss, metrics = policy_loss(
        logp, old, adv_bt, mask, level=level, aggregation=aggregation, ref_logp=ref, beta=0.1
    )
    want, want_metrics = np_policy_loss(
        logp, old, adv_bt, mask, level, *DEFAULT_EPS[level], aggregation, ref=ref, beta=0.1
    )
    assert 0 < want_metrics["clip_frac/token"] < 1
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics, want_metrics)


def test_sequence_level_rejects_token_advantages():
    logp, old, adv_bt, mask, _ = make_batch(0, 1e-3, token_adv=True)
    with pytest.raises(ValueError, match="sequence_token"):
        policy_loss(logp, old, adv_bt, mask, level="sequence")


def test_sequence_mean_counts_each_sequence_once():
    # Two sequences, lengths 1 and 9, same s = 1, A = +1 and -1. Each sequence counts once:
    # J = (1 - 1) / 2 = 0. Summing over tokens (the seed sketch's .mean()) gives (1 - 9) / 10.
    mask = np.zeros((2, 9), np.int32)
    mask[0, :1] = 1
    mask[1, :] = 1
    logp = np.full((2, 9), -1.0, np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    loss, _ = policy_loss(logp, logp, adv, mask, level="sequence")
    np.testing.assert_allclose(float(loss), 0.0, atol=1e-7)
    loss_tok, _ = policy_loss(logp, logp, adv, mask, level="sequence", aggregation="token-mean")
    np.testing.assert_allclose(float(loss_tok), -(1.0 - 9.0) / 10.0, rtol=1e-6)


# ----------------------------------------------------------------------------- gradients


def grad_logp(level, logp, old, adv, mask, **kwargs):
    return jax.grad(lambda lp: policy_loss(lp, old, adv, mask, level=level, **kwargs)[0])(jnp.asarray(logp))


def test_gspo_gradient_is_paper_eq10():
    logp, old, adv, mask, _ = make_batch(0, 1e-3)
    grad = np.asarray(grad_logp("sequence", logp, old, adv, mask))
    m = mask != 0
    n = m.sum(axis=1)
    valid = n > 0
    log_s = np.where(m, logp.astype(np.float64) - old, 0.0).sum(axis=1) / np.maximum(n, 1)
    s = np.exp(log_s)
    clipped = ((s > 1 + 4e-4) & (adv > 0)) | ((s < 1 - 3e-4) & (adv < 0))
    assert clipped[valid].any() and (~clipped[valid]).any()
    # d(-J)/d logp_i,t = -(1/N) s_i A_i / |y_i| on unclipped sequences, N = sequences with tokens.
    weight = np.where(clipped | ~valid, 0.0, -s * adv / np.maximum(n, 1) / valid.sum())
    want = np.where(m, weight[:, None], 0.0)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gspo_token_equals_gspo_with_sequence_advantages(aggregation):
    logp, old, adv, mask, ref = make_batch(2, 1e-3)
    kwargs = dict(aggregation=aggregation, ref_logp=ref, beta=0.02)
    loss_s, metrics_s = policy_loss(logp, old, adv, mask, level="sequence", **kwargs)
    loss_t, metrics_t = policy_loss(logp, old, adv, mask, level="sequence_token", **kwargs)
    assert 0 < float(metrics_s["clip_frac/seq"]) < 1
    np.testing.assert_allclose(float(loss_t), float(loss_s), rtol=1e-6)
    for key in metrics_s:
        np.testing.assert_allclose(
            float(metrics_t[key]), float(metrics_s[key]), rtol=1e-6, atol=1e-7, err_msg=key
        )
    np.testing.assert_allclose(
        grad_logp("sequence_token", logp, old, adv, mask, **kwargs),
        grad_logp("sequence", logp, old, adv, mask, **kwargs),
        rtol=1e-5,
        atol=1e-9,
    )


# ----------------------------------------------------------------------------- padding, masks


@pytest.mark.parametrize("level", LEVELS)
def test_extra_padding_changes_nothing(level):
    logp, old, adv, mask, ref = make_batch(3, NOISE[level])
    B, T = logp.shape

    def pad(x, value):
        x = np.concatenate([x, np.full((B, 3), value, x.dtype)], axis=1)
        return np.concatenate([x, np.full((2, T + 3), value, x.dtype)], axis=0)

    padded = (
        pad(logp, np.nan),
        pad(old, -1e30),
        np.concatenate([adv, [np.nan, 1e9]]),
        pad(mask, 0),
        pad(ref, np.inf),
    )
    kwargs = dict(level=level, beta=0.1)

    def loss_and_grad(lp, o, a, m, r):
        return jax.value_and_grad(lambda x: policy_loss(x, o, a, m, ref_logp=r, **kwargs), has_aux=True)(
            jnp.asarray(lp)
        )

    (loss, metrics), grad = loss_and_grad(logp, old, adv, mask, ref)
    (loss_p, metrics_p), grad_p = loss_and_grad(*padded)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    for key in metrics:
        np.testing.assert_allclose(float(metrics_p[key]), float(metrics[key]), rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(grad_p[:B, :T], grad, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(grad_p[B:], 0.0)
    np.testing.assert_array_equal(grad_p[:, T:], 0.0)


@pytest.mark.parametrize("level", LEVELS)
def test_lengths_come_from_the_mask(level):
    # Same tokens right-padded and left-padded, mask given as int / bool / float: same loss.
    logp, old, adv, mask, _ = make_batch(4, NOISE[level])
    lengths = mask.sum(axis=1)

    def roll(x):
        return np.stack([np.roll(row, x.shape[1] - n) for row, n in zip(x, lengths)])

    base, _ = policy_loss(logp, old, adv, mask, level=level)
    left, _ = policy_loss(roll(logp), roll(old), adv, roll(mask), level=level)
    as_bool, _ = policy_loss(logp, old, adv, mask.astype(bool), level=level)
    as_float, _ = policy_loss(logp, old, adv, mask.astype(np.float32), level=level)
    want, _ = np_policy_loss(logp, old, adv, mask, level, *DEFAULT_EPS[level], "seq-mean-token-mean")
    for got in (base, left, as_bool, as_float):
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_all_padding_batch_is_zero_and_finite():
    zeros = np.zeros((3, 4), np.float32)
    for level in LEVELS:
        loss, metrics = policy_loss(zeros, zeros, np.ones(3), zeros, level=level)
        assert float(loss) == 0.0
        assert all(np.isfinite(float(v)) for v in metrics.values())


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("level", LEVELS)
def test_on_policy_ratio_is_one_and_nothing_clips(level):
    logp, _, adv, mask, _ = make_batch(5, 0.0)
    loss, metrics = policy_loss(logp, logp, adv, mask, level=level)
    for key in ("ratio/mean", "ratio/min", "ratio/max"):
        assert float(metrics[key]) == 1.0, key
    for key in CLIP_METRICS + ("log_ratio_seq/abs_mean", "kl"):
        assert float(metrics[key]) == 0.0, key
    valid = mask.sum(axis=1) > 0
    np.testing.assert_allclose(float(loss), -adv[valid].mean(), rtol=1e-6)


def sequences_with_log_ratios(log_s, lengths, T=5):
    """logp/old/mask where sequence i has length lengths[i] and mean log-ratio log_s[i]."""
    B = len(lengths)
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    old = np.full((B, T), -2.0)
    logp = old + np.asarray(log_s, np.float64)[:, None]
    return logp.astype(np.float32), old.astype(np.float32), mask


@pytest.mark.parametrize("level", SEQUENCE_LEVELS)
def test_off_policy_clip_fires_low_and_high(level):
    # seq 0: s > 1 + eps_high, A > 0 -> clipped high; seq 1: s < 1 - eps_low, A < 0 -> low;
    # seq 2: s > 1 + eps_high but A < 0 -> not clipped; seq 3: inside the range.
    lengths = (3, 1, 4, 2)
    logp, old, mask = sequences_with_log_ratios([1e-3, -1e-3, 1e-3, 1e-4], lengths)
    adv = np.array([1.0, -1.0, -1.0, 1.0], np.float32)
    loss, metrics = policy_loss(logp, old, adv, mask, level=level)
    want = {
        "clip_frac/seq": 0.5,
        "clip_frac/seq_low": 0.25,
        "clip_frac/seq_high": 0.25,
        "clip_frac/token": 0.4,
        "clip_frac/token_low": 0.1,
        "clip_frac/token_high": 0.3,
    }
    assert_metrics_close(metrics, want, rtol=0, atol=1e-7)
    log_s = np.array([np.mean(logp[i, :n].astype(np.float64) - old[i, :n]) for i, n in enumerate(lengths)])
    s = np.exp(log_s)
    np.testing.assert_allclose(float(metrics["ratio/max"]), s.max(), rtol=1e-7)
    np.testing.assert_allclose(float(metrics["ratio/min"]), s.min(), rtol=1e-7)
    np.testing.assert_allclose(float(metrics["log_ratio_seq/abs_mean"]), np.mean(np.abs(log_s)), rtol=1e-5)
    want_loss = -np.mean([(1 + 4e-4), -(1 - 3e-4), -s[2], s[3]])
    np.testing.assert_allclose(float(loss), want_loss, atol=1e-7)
    grad = grad_logp(level, logp, old, adv, mask)
    np.testing.assert_array_equal(grad[:2], 0.0)  # clipped sequences get no gradient
    assert np.all(np.asarray(grad)[2:][mask[2:] == 1] != 0)


def test_token_level_clip_fires_low_and_high():
    log_w = np.log([[1.3, 1.0, 0.7], [0.7, 1.3, 1.1]])
    old = np.full((2, 3), -1.0, np.float32)
    logp = (old + log_w).astype(np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    adv = np.array([1.0, -1.0], np.float32)
    loss, metrics = policy_loss(logp, old, adv, mask, level="token")
    # Row 0 (A > 0): 1.3 clipped high. Row 1 (A < 0): 0.7 clipped low, 1.3 not clipped.
    want = {
        "clip_frac/token": 0.4,
        "clip_frac/token_low": 0.2,
        "clip_frac/token_high": 0.2,
        "clip_frac/seq": (1 / 3 + 1 / 2) / 2,
        "clip_frac/seq_low": 0.25,
        "clip_frac/seq_high": 1 / 6,
        "ratio/max": 1.3,
        "ratio/min": 0.7,
        "ratio/mean": (1.3 + 1.0 + 0.7 + 0.7 + 1.3) / 5,
    }
    assert_metrics_close(metrics, want, rtol=1e-6)
    want_loss = -np.mean([(1.28 + 1.0 + 0.7) / 3, (-0.8 - 1.3) / 2])
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)


@pytest.mark.parametrize(
    "level,inside,outside",
    [("sequence", 3.5e-4, 5e-4), ("sequence_token", 3.5e-4, 5e-4), ("token", 0.24, 0.3)],
)
def test_default_clip_range_follows_level(level, inside, outside):
    # Default eps_high: 4e-4 for the sequence ratio, 0.28 for the token ratio (not the 0.2-0.5
    # "token-range" width the seed note suggests for GSPO).
    logp, old, mask = sequences_with_log_ratios([inside, outside], (2, 2))
    _, metrics = policy_loss(logp, old, np.ones(2, np.float32), mask, level=level)
    np.testing.assert_allclose(float(metrics["clip_frac/seq_high"]), 0.5, atol=1e-7)
    eps_low = DEFAULT_EPS[level][0]
    logp, old, mask = sequences_with_log_ratios([np.log1p(-eps_low * 0.8), np.log1p(-eps_low * 1.2)], (2, 2))
    _, metrics = policy_loss(logp, old, -np.ones(2, np.float32), mask, level=level)
    np.testing.assert_allclose(float(metrics["clip_frac/seq_low"]), 0.5, atol=1e-7)


def tiny_policy_logp(theta_tv, tokens_bt):
    """A context-free policy: token t of every sequence ~ softmax(theta[t]). [B, T]"""
    logp_tv = jax.nn.log_softmax(theta_tv, axis=-1)
    return jnp.take_along_axis(logp_tv[None], tokens_bt[..., None], axis=-1)[..., 0]


def test_second_minibatch_update_moves_ratio_and_clips():
    # One rollout batch split into two minibatches (paper: 4). Update 1 is on-policy; after one
    # parameter step update 2 sees logp != old_logp, so the ratio leaves 1 and the clip acts.
    rng = np.random.default_rng(6)
    B, T, V, G = 16, 6, 5, 4
    theta0 = jnp.asarray(rng.normal(size=(T, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)))
    mask = (np.arange(T)[None] < rng.integers(1, T + 1, B)[:, None]).astype(np.int32)
    rewards = (np.asarray(tokens) == 0).sum(axis=1) + rng.integers(0, 2, B)
    adv, _ = group_advantages(jnp.asarray(rewards, jnp.float32), G)
    old_logp = tiny_policy_logp(theta0, tokens)
    minibatches = [slice(0, 8), slice(8, 16)]

    def loss_fn(theta, mb):
        return policy_loss(
            tiny_policy_logp(theta, tokens[mb]), old_logp[mb], adv[mb], mask[mb], level="sequence"
        )

    (_, metrics1), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta0, minibatches[0])
    assert float(metrics1["ratio/mean"]) == 1.0 and float(metrics1["clip_frac/seq"]) == 0.0
    theta1 = theta0 - 0.5 * grad
    loss2, metrics2 = loss_fn(theta1, minibatches[1])
    assert float(metrics2["log_ratio_seq/abs_mean"]) > 1e-3
    assert float(metrics2["clip_frac/seq"]) > 0
    logp2 = np.asarray(tiny_policy_logp(theta1, tokens[minibatches[1]]))
    want, want_metrics = np_policy_loss(
        logp2,
        np.asarray(old_logp[minibatches[1]]),
        np.asarray(adv[minibatches[1]]),
        mask[minibatches[1]],
        "sequence",
        3e-4,
        4e-4,
        "seq-mean-token-mean",
    )
    np.testing.assert_allclose(float(loss2), want, rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics2, want_metrics)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", LEVELS)
def test_extreme_log_ratios_are_finite(level, aggregation):
    _, old, adv, mask, _ = make_batch(7, 0.0)
    signs = np.where(np.arange(old.size).reshape(old.shape) % 2, 1.0, -1.0)
    logp = (old + 1e4 * signs).astype(np.float32)
    ref = (old - 1e4 * signs).astype(np.float32)
    (loss, metrics), grad = jax.value_and_grad(
        lambda lp: policy_loss(
            lp, old, adv, mask, level=level, aggregation=aggregation, ref_logp=ref, beta=0.1
        ),
        has_aux=True,
    )(jnp.asarray(logp))
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(grad))
    assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("level", LEVELS)
def test_bf16_inputs_compute_ratios_in_fp32(level):
    logp, old, adv, mask, ref = make_batch(8, 0.05)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    up = lambda x: np.asarray(bf(x), np.float64)  # the values the loss actually sees  # noqa: E731
    eps = (0.01, 0.01)
    (loss, metrics), grad = jax.value_and_grad(
        lambda lp: policy_loss(
            lp,
            bf(old),
            bf(adv),
            mask,
            level=level,
            eps_low=eps[0],
            eps_high=eps[1],
            ref_logp=bf(ref),
            beta=0.1,
        ),
        has_aux=True,
    )(bf(logp))
    want, want_metrics = np_policy_loss(
        up(logp), up(old), up(adv), mask, level, *eps, "seq-mean-token-mean", ref=up(ref), beta=0.1
    )
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    # fp32 arithmetic on the bf16 values: bf16 arithmetic would be off by ~1e-2 relative.
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics, want_metrics)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_jit_matches_eager():
    logp, old, adv, mask, ref = make_batch(9, 1e-3)
    fn = functools.partial(policy_loss, level="sequence", beta=0.1)
    eager = fn(logp, old, adv, mask, ref_logp=ref)
    jitted = jax.jit(fn)(logp, old, adv, mask, ref_logp=ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


# ----------------------------------------------------------------------------- registry, errors


def test_registry_dispatches_a_new_objective(monkeypatch):
    def plain_policy_gradient(log_ratio_bt, advantages, mask_bt, eps_low, eps_high):
        ratio_bt = jnp.exp(log_ratio_bt)
        never = jnp.zeros(mask_bt.shape, bool)
        return losses.ObjectiveTerms(ratio_bt * advantages[:, None], never, never, ratio_bt)

    monkeypatch.setitem(
        losses.POLICY_OBJECTIVES, "plain", losses.PolicyObjective(plain_policy_gradient, 0.0, 0.0)
    )
    logp, old, adv, mask, _ = make_batch(10, 0.1)
    loss, _ = policy_loss(logp, old, adv, mask, level="plain", aggregation="token-mean")
    m = mask != 0
    ratio = np.exp(np.where(m, logp - old.astype(np.float64), 0.0))
    want = -(ratio * adv[:, None])[m].sum() / m.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    logp, old, adv, mask, _ = make_batch(0, 1e-3)
    with pytest.raises(ValueError, match=r"\['sequence', 'sequence_token', 'token'\]"):
        policy_loss(logp, old, adv, mask, level="gspo")
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        policy_loss(logp, old, adv, mask, level="sequence", aggregation="sum")
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, old[:, :3], adv, mask, level="sequence")
    with pytest.raises(ValueError, match="one per sequence"):
        policy_loss(logp, old, adv[:3], mask, level="sequence")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, level="sequence", beta=0.1)
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(logp, old, adv, mask, level="token", eps_low=-0.1)


# ----------------------------------------------------------------------------- finite differences


def finite_difference_grad(f, x, h=1e-6):
    """Central differences of a float64 function at every entry of x."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("token_adv", [False, True])
def test_token_level_gradient_matches_finite_differences(aggregation, token_adv):
    logp, old, adv, mask, _ = make_batch(7, NOISE["token"], token_adv=token_adv)
    eps_low, eps_high = DEFAULT_EPS["token"]
    got = np.asarray(grad_logp("token", logp, old, adv, mask, aggregation=aggregation))
    ratio = np.exp(np.where(mask == 1, logp.astype(np.float64) - old, 0.0))
    # Both the clipped (zero-gradient) and the unclipped branch occur among real tokens.
    adv_bt = np.broadcast_to(adv[:, None], mask.shape) if adv.ndim == 1 else adv
    clipped = ((ratio > 1 + eps_high) & (adv_bt > 0)) | ((ratio < 1 - eps_low) & (adv_bt < 0))
    assert clipped[mask == 1].any() and (~clipped[mask == 1]).any()

    def reference(x):
        full = np.where(mask == 1, x, logp)  # padded entries keep their garbage
        return np_policy_loss(full, old, adv, mask, "token", eps_low, eps_high, aggregation)[0]

    want = finite_difference_grad(reference, np.where(mask == 1, logp, 0.0))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], rtol=1e-4, atol=1e-7)
    assert np.all(got[mask == 0] == 0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", LEVELS)
def test_kl_term_gradient_matches_finite_differences(level, aggregation):
    logp, old, _, mask, ref = make_batch(8, 0.3)
    beta = 0.05
    zero_adv = np.zeros(mask.shape[0], np.float32)  # no policy gradient: only the KL term is left
    kwargs = dict(aggregation=aggregation, ref_logp=ref, beta=beta)
    got = np.asarray(grad_logp(level, logp, old, zero_adv, mask, **kwargs))

    def reference(x):
        full = np.where(mask == 1, x, logp)
        return np_policy_loss(full, old, zero_adv, mask, level, 0.2, 0.28, aggregation, ref=ref, beta=beta)[0]

    want = finite_difference_grad(reference, np.where(mask == 1, logp, 0.0))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], rtol=1e-4, atol=1e-8)
    assert np.all(got[mask == 0] == 0)
    # Closed form: d k3 / d logp = 1 - exp(ref - logp), times beta and the aggregation's weight.
    lengths = mask.sum(1, keepdims=True)
    sequences = (lengths > 0).sum()
    weight = 1 / mask.sum() if aggregation == "token-mean" else 1 / (np.maximum(lengths, 1) * sequences)
    closed = beta * (1 - np.exp(ref.astype(np.float64) - logp)) * weight
    np.testing.assert_allclose(got[mask == 1], np.broadcast_to(closed, mask.shape)[mask == 1], rtol=1e-4)
