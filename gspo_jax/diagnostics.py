"""Diagnostics of the GSPO paper's claims, as pure functions: expert-routing volatility between two
forwards over the same tokens, and importance-ratio statistics by completion-length bin.

The jitted update (update.py) calls the jnp functions once per minibatch update; `combine_length_bins`
(numpy, on the host) folds the per-update bin statistics into the step's metrics row. How they are
computed and what they cost: BUILD_NOTES.md, "Diagnostics".
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

LENGTH_BINS = 4  # completion-length bins of the ratio statistics (quartiles of [1, max_new_tokens])


def routing_volatility(ids_before_lbtk, ids_after_lbtk, valid_bt):
    """[L] float32: per MoE layer, the fraction of valid positions whose top-k expert set differs.

    ids_*: [L, B, T, k] expert ids of two forwards over the same tokens (the order within a
    position's k ids does not matter: sets are compared); valid_bt: [B, T], nonzero on real tokens
    (prompt and completion); padding positions are ignored. 0 for a batch with no real token.
    """
    changed_lbt = jnp.any(jnp.sort(ids_before_lbtk, axis=-1) != jnp.sort(ids_after_lbtk, axis=-1), axis=-1)
    valid_bt = valid_bt != 0
    changed_l = jnp.sum(changed_lbt & valid_bt, axis=(1, 2), dtype=jnp.float32)
    return changed_l / jnp.maximum(jnp.sum(valid_bt, dtype=jnp.float32), 1.0)


def volatility_metrics(ids_before_lbtk, ids_after_lbtk, valid_bt) -> dict:
    """routing/volatility (over all (token, MoE layer) pairs) and routing/volatility_layer{i}."""
    per_layer = routing_volatility(ids_before_lbtk, ids_after_lbtk, valid_bt)
    # Every layer sees the same tokens, so the mean over layers is the fraction over all pairs.
    metrics = {"routing/volatility": jnp.mean(per_layer)}
    metrics |= {f"routing/volatility_layer{i}": per_layer[i] for i in range(per_layer.shape[0])}
    return metrics


def length_bin_edges(max_new_tokens: int, bins: int = LENGTH_BINS) -> tuple[int, ...]:
    """Upper completion lengths of `bins` bins splitting [1, max_new_tokens] evenly (bin j holds
    lengths in (edges[j-1], edges[j]], edges[-1] = 0); a bin is empty when it has no length (tiny
    max_new_tokens)."""
    return tuple(math.ceil(max_new_tokens * (j + 1) / bins) for j in range(bins))


def _population_variance(x_b, in_bin_b, count):
    mean = jnp.sum(jnp.where(in_bin_b, x_b, 0.0)) / jnp.maximum(count, 1.0)
    return jnp.sum(jnp.where(in_bin_b, jnp.square(x_b - mean), 0.0)) / jnp.maximum(count, 1.0)


def ratio_by_length(logp_bt, old_logp_bt, mask_bt, edges: tuple[int, ...]) -> dict:
    """Per completion-length bin j of one minibatch (mask_bt [B, T] nonzero on completion tokens):

    ratio_len/bin{j}_count: sequences whose length |y| falls in the bin;
    ratio_len/bin{j}_var_token_logratio_sum: population variance over them of sum_t log r_t;
    ratio_len/bin{j}_var_seq_logratio: the same of (1/|y|) sum_t log r_t, GSPO's log s_i;
    log r_t = logp - old_logp (fp32). An empty bin gives count 0 and variances 0.
    """
    mask_bt = mask_bt != 0
    log_ratio_bt = jnp.where(mask_bt, logp_bt.astype(jnp.float32) - old_logp_bt.astype(jnp.float32), 0.0)
    lengths_b = jnp.sum(mask_bt, axis=-1)
    total_b = jnp.sum(log_ratio_bt, axis=-1)
    normalised_b = total_b / jnp.maximum(lengths_b, 1)
    metrics, lower = {}, 0
    for j, upper in enumerate(edges):
        in_bin_b = (lengths_b > lower) & (lengths_b <= upper)
        count = jnp.sum(in_bin_b, dtype=jnp.float32)
        metrics[f"ratio_len/bin{j}_count"] = count
        metrics[f"ratio_len/bin{j}_var_token_logratio_sum"] = _population_variance(total_b, in_bin_b, count)
        metrics[f"ratio_len/bin{j}_var_seq_logratio"] = _population_variance(normalised_b, in_bin_b, count)
        lower = upper
    return metrics


def combine_length_bins(per_update: dict[str, np.ndarray], edges: tuple[int, ...]) -> dict[str, float]:
    """The step's row from per-update bin statistics ([iterations, minibatches] arrays).

    A variance is the pooled within-update variance (the count-weighted mean of the updates'
    variances: each update compares one parameter state with pi_old); a count is the number of the
    step's sequences in the bin (each is seen once per iteration); bin{j}_max_len is the bin's edge.
    """
    row = {}
    for j, upper in enumerate(edges):
        counts = np.asarray(per_update[f"ratio_len/bin{j}_count"], np.float64)
        row[f"ratio_len/bin{j}_max_len"] = float(upper)
        row[f"ratio_len/bin{j}_count"] = float(counts.sum() / counts.shape[0])
        for stat in ("var_token_logratio_sum", "var_seq_logratio"):
            values = np.asarray(per_update[f"ratio_len/bin{j}_{stat}"], np.float64)
            row[f"ratio_len/bin{j}_{stat}"] = float(np.sum(counts * values) / max(counts.sum(), 1.0))
    return row
