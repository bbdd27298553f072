"""Group advantages and the GSPO / GSPO-token / GRPO policy losses (pure jnp: no model, no I/O).

Shapes: B = sequences in the (mini)batch, T = completion positions, N = prompts, G = group size.
`logp_bt`, `old_logp_bt`, `mask_bt` are [B, T] over completion tokens only; `mask_bt` is nonzero
exactly on real completion tokens, so a sequence's length |y_i| is its mask count (never a word
count), padding may sit anywhere, and rows with an all-zero mask (padding rows, zero-length
completions) contribute nothing.

Conventions (see BUILD_NOTES.md for the reasoning):
- Group std is the unbiased sample std (ddof=1), as torch's `Tensor.std()` in TRL and verl, so a
  user moving from them gets the same advantages (at G=2 the two conventions differ by sqrt(2)).
- Log-ratios are clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND] before every exp. Inside the bound
  value and gradient are exact; beyond it (a ratio above e^20 ~ 5e8) the value saturates and the
  gradient is zero, so extreme inputs give finite losses and grads instead of inf/NaN.
- All ratio arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

LOG_RATIO_BOUND = 20.0
DEFAULT_AGGREGATION = "seq-mean-token-mean"


def _lookup(registry: dict, name, what: str):
    if name not in registry:
        raise ValueError(f"Unknown {what} {name!r}; choose one of {sorted(registry)}.")
    return registry[name]


# ----------------------------------------------------------------------------- advantages


def _group_std(rewards_ng: jax.Array) -> jax.Array:
    return jnp.std(rewards_ng, axis=1, ddof=1, keepdims=True)


def _batch_std(rewards_ng: jax.Array) -> jax.Array:
    return jnp.std(rewards_ng, ddof=1)


def _no_scale(rewards_ng: jax.Array) -> jax.Array:
    return jnp.ones((), rewards_ng.dtype)


# Denominator of the centred rewards, by `scale` name: the group's own std (GRPO/GSPO), the std
# of all rewards in the batch (TRL's scale_rewards="batch"), or none (Dr. GRPO).
ADVANTAGE_SCALES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "group": _group_std,
    "batch": _batch_std,
    "none": _no_scale,
}


def group_advantages(rewards, group_size: int, *, scale: str = "group", eps: float = 1e-6):
    """Group-relative advantages A_i = (r_i - mean_group r) / (std + eps).

    Args:
      rewards: [N * G] rewards, groups contiguous: rows i*G .. i*G+G-1 answer prompt i.
      group_size: G >= 2.
      scale: "group" (std within the group), "batch" (std of all N*G rewards), "none" (only
        centre). Stds are unbiased (ddof=1).
      eps: added to the std.

    Returns:
      (advantages [N * G] float32, metrics). A group whose rewards are all equal gets exactly 0.
      Metrics: `frac_reward_zero_std` (fraction of such groups), `reward/mean`, `reward/std`,
      `advantage/mean|std|min|max` (metric stds are population stds over the batch).
    """
    rewards_n = jnp.asarray(rewards, jnp.float32)
    if rewards_n.ndim != 1:
        raise ValueError(
            f"rewards must be flat [N * G] (groups contiguous); got shape {rewards_n.shape}. "
            "Reshape with rewards.reshape(-1)."
        )
    if not isinstance(group_size, numbers.Integral) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2; got {group_size!r}.")
    if rewards_n.shape[0] % group_size:
        raise ValueError(
            f"{rewards_n.shape[0]} rewards do not split into groups of {group_size}; pass "
            "N prompts x G responses with G = group_size."
        )
    std_fn = _lookup(ADVANTAGE_SCALES, scale, "advantage scale")

    rewards_ng = rewards_n.reshape(-1, group_size)
    centred_ng = rewards_ng - rewards_ng.mean(axis=1, keepdims=True)
    # Exact test (max == min) rather than std < tol: float means of equal values can be off by an
    # ulp, and that ulp divided by eps would be a spurious advantage.
    zero_std_n = rewards_ng.max(axis=1) == rewards_ng.min(axis=1)
    advantages_ng = jnp.where(zero_std_n[:, None], 0.0, centred_ng / (std_fn(rewards_ng) + eps))
    advantages_n = advantages_ng.reshape(-1)
    metrics = {
        "frac_reward_zero_std": zero_std_n.mean(dtype=jnp.float32),
        "reward/mean": rewards_n.mean(),
        "reward/std": rewards_n.std(),
        "advantage/mean": advantages_n.mean(),
        "advantage/std": advantages_n.std(),
        "advantage/min": advantages_n.min(),
        "advantage/max": advantages_n.max(),
    }
    return advantages_n, metrics


# ----------------------------------------------------------------------------- helpers


def _safe_exp(log_x: jax.Array) -> jax.Array:
    return jnp.exp(jnp.clip(log_x, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))


def _k3(log_ratio: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(q || p) per sample x ~ q, log_ratio = log p(x) - log q(x)."""
    clamped = jnp.clip(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return jnp.exp(clamped) - clamped - 1.0


def _sequence_log_ratio(log_ratio_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """log s_i = mean over completion tokens of log pi_theta - log pi_old; 0 on empty rows. [B]"""
    lengths_b = mask_bt.sum(axis=-1)
    return jnp.where(mask_bt, log_ratio_bt, 0.0).sum(axis=-1) / jnp.maximum(lengths_b, 1)


def _per_token(advantages: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """[B] or [B, T] advantages -> [B, T]."""
    if advantages.ndim == 1:
        return jnp.broadcast_to(advantages[:, None], mask_bt.shape)
    return advantages


def _masked_mean(x: jax.Array, m: jax.Array) -> jax.Array:
    return jnp.where(m, x, 0.0).sum() / jnp.maximum(m.sum(), 1)


def _masked_std(x: jax.Array, m: jax.Array) -> jax.Array:
    mean = _masked_mean(x, m)
    return jnp.sqrt(_masked_mean(jnp.square(x - mean), m))


def _masked_min(x: jax.Array, m: jax.Array) -> jax.Array:
    return jnp.where(m.any(), jnp.where(m, x, jnp.inf).min(), 0.0)


def _masked_max(x: jax.Array, m: jax.Array) -> jax.Array:
    return jnp.where(m.any(), jnp.where(m, x, -jnp.inf).max(), 0.0)


# ----------------------------------------------------------------------------- aggregations


def seq_mean_token_mean(values_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Mean over each sequence's tokens, then mean over the sequences with >= 1 token."""
    lengths_b = mask_bt.sum(axis=-1)
    per_sequence_b = jnp.where(mask_bt, values_bt, 0.0).sum(axis=-1) / jnp.maximum(lengths_b, 1)
    return per_sequence_b.sum() / jnp.maximum((lengths_b > 0).sum(), 1)


def token_mean(values_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Mean over all completion tokens of the batch (DAPO): a sequence weighs by its length."""
    return _masked_mean(values_bt, mask_bt)


def aggregation_denominator(aggregation, mask_bt: jax.Array) -> jax.Array:
    """What `aggregation` divides a batch's sum by, before its floor of 1: the sequences with >= 1
    token ("seq-mean-token-mean") or the tokens ("token-mean"). A batch split into parts has
    aggregate = sum over parts of (part's denominator / batch's) x part's aggregate, which is how
    gradient accumulation weighs micro-batches."""
    name = aggregation or DEFAULT_AGGREGATION
    mask_bt = mask_bt != 0
    if name == "seq-mean-token-mean":
        return jnp.sum(mask_bt.any(axis=-1), dtype=jnp.float32)
    if name == "token-mean":
        return jnp.sum(mask_bt, dtype=jnp.float32)
    raise ValueError(f"aggregation {name!r}: use one of {sorted(AGGREGATIONS)}")


def logprob_gap_metrics(logp_bt: jax.Array, sampler_logp_bt: jax.Array, mask_bt: jax.Array) -> dict:
    """How far the trainer's log-probs are from the sampler's for the same tokens (paper section 5.4).

    logprob_gap/token_abs: mean |logp - sampler_logp| over completion tokens.
    logprob_gap/seq_abs: mean over sequences with tokens of |mean over the sequence's tokens of
      (logp - sampler_logp)|: the log s_i the sequence ratio would see on-policy, to compare with the
      sequence-level clip width.
    """
    mask_bt = mask_bt != 0
    gap_bt = logp_bt.astype(jnp.float32) - sampler_logp_bt.astype(jnp.float32)
    seq_gap_b = jnp.abs(_sequence_log_ratio(gap_bt, mask_bt))
    nonempty_b = mask_bt.any(axis=-1)
    return {
        "logprob_gap/token_abs": _masked_mean(jnp.abs(gap_bt), mask_bt),
        "logprob_gap/seq_abs": _masked_mean(seq_gap_b, nonempty_b),
    }


def clip_widths(level: str, eps_low: float | None, eps_high: float | None) -> tuple[float, float]:
    """(eps_low, eps_high) with None replaced by the level's default."""
    objective = _lookup(POLICY_OBJECTIVES, level, "level")
    return (
        objective.eps_low if eps_low is None else eps_low,
        objective.eps_high if eps_high is None else eps_high,
    )


AGGREGATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "seq-mean-token-mean": seq_mean_token_mean,
    "token-mean": token_mean,
}


# ----------------------------------------------------------------------------- objectives


class ObjectiveTerms(NamedTuple):
    """What an objective hands back to `policy_loss`.

    objective_bt: per-token terms of J (maximised), [B, T]; read only where the mask is set.
    clipped_low_bt / clipped_high_bt: bool [B, T], the clipped term is active and differs.
    ratio: the ratio this level clips, [B] (sequence ratio s_i) or [B, T] (token ratio).
    """

    objective_bt: jax.Array
    clipped_low_bt: jax.Array
    clipped_high_bt: jax.Array
    ratio: jax.Array


def _ppo_clip(ratio, advantages, eps_low, eps_high):
    """min(r A, clip(r, 1-eps_low, 1+eps_high) A), written as an explicit choice of branch.

    Same value as the min; the clipped branch is a constant, so its gradient is exactly zero and
    an unclipped one is exactly A dr (no tie-splitting of jnp.minimum at r inside the range).
    """
    clipped_high = (ratio > 1.0 + eps_high) & (advantages > 0)
    clipped_low = (ratio < 1.0 - eps_low) & (advantages < 0)
    bounded = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    objective = jnp.where(clipped_low | clipped_high, bounded, ratio) * advantages
    return objective, clipped_low, clipped_high


def gspo_sequence(log_ratio_bt, advantages, mask_bt, eps_low, eps_high) -> ObjectiveTerms:
    """GSPO (paper Eq. 5-7): one length-normalised ratio s_i and one clip per sequence."""
    if advantages.ndim != 1:
        raise ValueError(
            "level='sequence' takes one advantage per sequence, shape [B]; for per-token "
            "advantages [B, T] use level='sequence_token'."
        )
    ratio_b = _safe_exp(_sequence_log_ratio(log_ratio_bt, mask_bt))
    objective_b, low_b, high_b = _ppo_clip(ratio_b, advantages, eps_low, eps_high)
    return ObjectiveTerms(
        _per_token(objective_b, mask_bt), _per_token(low_b, mask_bt), _per_token(high_b, mask_bt), ratio_b
    )


def gspo_token(log_ratio_bt, advantages, mask_bt, eps_low, eps_high) -> ObjectiveTerms:
    """GSPO-token (paper Eq. 13-14): s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)], clipped per token.

    Its value is s_i on every token and d s_i,t / d logp_t = s_i, so with one advantage per
    sequence it equals GSPO in value, clip decision and gradient.
    """
    ratio_b = jax.lax.stop_gradient(_safe_exp(_sequence_log_ratio(log_ratio_bt, mask_bt)))
    ratio_bt = ratio_b[:, None] * jnp.exp(log_ratio_bt - jax.lax.stop_gradient(log_ratio_bt))
    objective_bt, low_bt, high_bt = _ppo_clip(ratio_bt, _per_token(advantages, mask_bt), eps_low, eps_high)
    return ObjectiveTerms(objective_bt, low_bt, high_bt, ratio_b)


def grpo_token(log_ratio_bt, advantages, mask_bt, eps_low, eps_high) -> ObjectiveTerms:
    """GRPO: per-token ratio pi_theta(y_t) / pi_old(y_t), clipped per token."""
    ratio_bt = _safe_exp(log_ratio_bt)
    objective_bt, low_bt, high_bt = _ppo_clip(ratio_bt, _per_token(advantages, mask_bt), eps_low, eps_high)
    return ObjectiveTerms(objective_bt, low_bt, high_bt, ratio_bt)


class PolicyObjective(NamedTuple):
    """A registered objective and its default clip range."""

    fn: Callable[..., ObjectiveTerms]
    eps_low: float
    eps_high: float


# A new objective is one function with gspo_sequence's signature plus one entry here.
# Clip defaults: the GSPO paper's 3e-4 / 4e-4 for the length-normalised sequence ratio; the
# DAPO-style 0.2 / 0.28 for the token ratio.
POLICY_OBJECTIVES: dict[str, PolicyObjective] = {
    "sequence": PolicyObjective(gspo_sequence, 3e-4, 4e-4),
    "sequence_token": PolicyObjective(gspo_token, 3e-4, 4e-4),
    "token": PolicyObjective(grpo_token, 0.2, 0.28),
}


# ----------------------------------------------------------------------------- the loss


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, eps_low, eps_high, beta):
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T] over completion tokens; got shape {logp.shape}.")
    for name, x in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} has shape {x.shape}; it must match logp's {logp.shape}.")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages has shape {advantages.shape}; pass one per sequence {logp.shape[:1]} "
            f"or one per token {logp.shape}."
        )
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        if isinstance(eps, numbers.Real) and eps < 0:
            raise ValueError(f"{name} must be >= 0; got {eps}.")
    if ref_logp is None and isinstance(beta, numbers.Real) and beta != 0:
        raise ValueError(f"beta={beta} needs ref_logp (the reference policy's token log-probs).")


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    level,
    eps_low=None,
    eps_high=None,
    aggregation=None,
    ref_logp=None,
    beta=0.0,
):
    """Clipped policy-gradient loss -J (+ beta * KL to a reference) and its metrics.

    Args:
      logp: [B, T] log pi_theta of the completion tokens (any float dtype; math runs in fp32).
      old_logp: [B, T] log pi_old of the same tokens (no gradient is taken through it).
      advantages: [B] one per sequence, or [B, T] per token ("sequence_token" and "token" only).
      mask: [B, T], nonzero on completion tokens. Values under a zero mask are never read
        (they may be garbage, even NaN); rows with no token contribute nothing.
      level: key of POLICY_OBJECTIVES: "sequence" (GSPO), "sequence_token" (GSPO-token),
        "token" (GRPO).
      eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high]; None takes the level's default
        (3e-4 / 4e-4 for the sequence levels, 0.2 / 0.28 for "token").
      aggregation: key of AGGREGATIONS; None means "seq-mean-token-mean".
        "seq-mean-token-mean": per-token terms are averaged within each sequence, then over the
          sequences with at least one token; every sequence counts once (both papers). For
          "sequence" this is the mean of the per-sequence objectives (GSPO Eq. 5).
        "token-mean": the mean over all completion tokens of the batch (DAPO). A "sequence"-level
          term appears on each of its tokens, so each sequence is weighted by its length.
      ref_logp: [B, T] reference-policy log-probs, needed when beta != 0.
      beta: coefficient of the k3 KL estimate exp(ref - logp) - (ref - logp) - 1 per token,
        aggregated like the policy term. A Python number.

    Returns:
      (loss, metrics): scalar loss = -J + beta * kl_ref, and a dict of fp32 scalars computed under
      stop_gradient:
        loss/policy: -J.
        clip_frac/seq[_low|_high]: clip indicator aggregated seq-mean-token-mean, i.e. for the
          sequence levels (per-sequence advantages) the fraction of sequences clipped.
        clip_frac/token[_low|_high]: clipped tokens over all completion tokens (a clipped
          sequence counts all its tokens, as in the GSPO paper's figure).
        "low" = ratio < 1 - eps_low with A < 0; "high" = ratio > 1 + eps_high with A > 0.
        ratio/mean|min|max: of the ratio the level clips: s_i over the sequences with tokens for
          the sequence levels, the token ratio over completion tokens for "token".
        log_ratio_seq/abs_mean: mean |log s_i| over sequences with tokens (compare with eps).
        kl: token mean of k3 for KL(pi_old || pi_theta), exp(logp - old) - (logp - old) - 1.
        kl_ref: the aggregated KL-to-reference term (only when ref_logp is given).
        advantage/mean|std|min|max: over the sequences with tokens ([B]) or the tokens ([B, T]).
      Ratio metrics are 0 when the batch holds no completion token.
    """
    objective = _lookup(POLICY_OBJECTIVES, level, "level")
    aggregate = _lookup(AGGREGATIONS, aggregation or DEFAULT_AGGREGATION, "aggregation")
    eps_low, eps_high = clip_widths(level, eps_low, eps_high)
    logp, old_logp, advantages, mask = map(jnp.asarray, (logp, old_logp, advantages, mask))
    ref_logp = None if ref_logp is None else jnp.asarray(ref_logp)
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, eps_low, eps_high, beta)

    mask_bt = mask != 0
    valid_b = mask_bt.any(axis=-1)
    logp_bt = logp.astype(jnp.float32)
    # `where`, not multiplication by the mask: masked garbage (inf, NaN) must not leak into sums.
    log_ratio_bt = jnp.where(mask_bt, logp_bt - old_logp.astype(jnp.float32), 0.0)
    advantage_mask = valid_b if advantages.ndim == 1 else mask_bt
    advantages = jnp.where(advantage_mask, advantages.astype(jnp.float32), 0.0)

    terms = objective.fn(log_ratio_bt, advantages, mask_bt, eps_low, eps_high)
    policy_term = -aggregate(terms.objective_bt, mask_bt)
    loss = policy_term

    clipped_bt = terms.clipped_low_bt | terms.clipped_high_bt
    ratio_mask = valid_b if terms.ratio.ndim == 1 else mask_bt
    metrics = {
        "loss/policy": policy_term,
        "clip_frac/seq": seq_mean_token_mean(clipped_bt, mask_bt),
        "clip_frac/seq_low": seq_mean_token_mean(terms.clipped_low_bt, mask_bt),
        "clip_frac/seq_high": seq_mean_token_mean(terms.clipped_high_bt, mask_bt),
        "clip_frac/token": token_mean(clipped_bt, mask_bt),
        "clip_frac/token_low": token_mean(terms.clipped_low_bt, mask_bt),
        "clip_frac/token_high": token_mean(terms.clipped_high_bt, mask_bt),
        "ratio/mean": _masked_mean(terms.ratio, ratio_mask),
        "ratio/min": _masked_min(terms.ratio, ratio_mask),
        "ratio/max": _masked_max(terms.ratio, ratio_mask),
        "log_ratio_seq/abs_mean": _masked_mean(jnp.abs(_sequence_log_ratio(log_ratio_bt, mask_bt)), valid_b),
        "kl": token_mean(_k3(log_ratio_bt), mask_bt),
        "advantage/mean": _masked_mean(advantages, advantage_mask),
        "advantage/std": _masked_std(advantages, advantage_mask),
        "advantage/min": _masked_min(advantages, advantage_mask),
        "advantage/max": _masked_max(advantages, advantage_mask),
    }
    if ref_logp is not None:
        ref_log_ratio_bt = jnp.where(mask_bt, ref_logp.astype(jnp.float32) - logp_bt, 0.0)
        kl_ref = aggregate(_k3(ref_log_ratio_bt), mask_bt)
        loss = loss + beta * kl_ref
        metrics["kl_ref"] = kl_ref
    metrics = {k: jax.lax.stop_gradient(v.astype(jnp.float32)) for k, v in metrics.items()}
    return loss, metrics


def config_errors(algo) -> list[str]:
    """Problems with the `algo.*` keys of the objective, checked against this module's registries."""
    errors = []
    for key, value, registry in (
        ("importance_sampling_level", algo.importance_sampling_level, POLICY_OBJECTIVES),
        ("aggregation", algo.aggregation, AGGREGATIONS),
        ("advantage_scale", algo.advantage_scale, ADVANTAGE_SCALES),
    ):
        if value not in registry:
            errors.append(f"--config.algo.{key}: {value!r}: use one of {sorted(registry)}")
    for key in ("eps_low", "eps_high"):
        if algo[key] is not None and algo[key] < 0:
            errors.append(f"--config.algo.{key}: must be >= 0, got {algo[key]}")
    if algo.beta < 0:
        errors.append(f"--config.algo.beta: must be >= 0, got {algo.beta}")
    return errors
