"""Host side of a rollout: completions to text, rewards, group advantages, the trainer's batch layout."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

STEP_BUCKET_MIN = 8


def completion_texts(tokenizer, ids_bn: np.ndarray, mask_bn: np.ndarray, stop_ids) -> list[str]:
    """Decodes each row's generated tokens, without the stop token and the padding after it."""
    texts = []
    stop = set(int(s) for s in stop_ids)
    for ids, mask in zip(ids_bn, mask_bn):
        tokens = [int(t) for t in ids[mask.astype(bool)]]
        if tokens and tokens[-1] in stop:
            tokens = tokens[:-1]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


def completion_id_lists(ids_bn: np.ndarray, mask_bn: np.ndarray) -> list[list[int]]:
    """Each row's generated token ids (stop token included), as reward functions receive them."""
    return [[int(t) for t in ids[m.astype(bool)]] for ids, m in zip(ids_bn, mask_bn)]


def repeat_per_sample(values: list[Any], group_size: int) -> list[Any]:
    """[x0, x1] -> [x0]*G + [x1]*G: matches the sampler's prompt-major row order."""
    return [v for v in values for _ in range(group_size)]


def completion_bucket(longest: int, max_new_tokens: int) -> int:
    """Training length for a batch whose longest completion is `longest`: the next power of two (at least
    STEP_BUCKET_MIN, at most max_new_tokens), so short batches train cheaply with few compilations."""
    width = STEP_BUCKET_MIN
    while width < longest:
        width *= 2
    return min(width, max_new_tokens)


@dataclasses.dataclass
class ScoredRollout:
    """Host-side results of one rollout for metrics and sample logs."""

    prompts: list[str]
    completions: list[str]
    rewards: np.ndarray  # [B]
    reward_columns: dict[str, np.ndarray]
    lengths: np.ndarray  # [B] completion tokens incl. the stop token
    truncated: np.ndarray  # [B] bool: hit max_new_tokens without a stop token

    def metrics(self) -> dict[str, float]:
        out = {
            "reward/mean": float(np.mean(self.rewards)),
            "reward/std": float(np.std(self.rewards)),
            "reward/max": float(np.max(self.rewards)),
            "completion_len/mean": float(np.mean(self.lengths)),
            "completion_len/max": float(np.max(self.lengths)),
            "completion/truncated_frac": float(np.mean(self.truncated)),
        }
        for name, column in self.reward_columns.items():
            out[f"reward/{name}/mean"] = float(np.mean(column))
        return out

    def samples(self, n: int) -> list[dict[str, Any]]:
        return [
            {"prompt": self.prompts[i], "completion": self.completions[i], "reward": float(self.rewards[i])}
            for i in range(min(n, len(self.prompts)))
        ]


def score_rollout(
    tokenizer,
    reward_set,
    prompts: list[str],
    fields: dict[str, list[Any]],
    group_size: int,
    ids_bn: np.ndarray,
    mask_bn: np.ndarray,
    stop_ids,
) -> ScoredRollout:
    """Rewards for B = len(prompts) * G completions (rows prompt-major)."""
    completions = completion_texts(tokenizer, ids_bn, mask_bn, stop_ids)
    rep_prompts = repeat_per_sample(prompts, group_size)
    rep_fields = {k: repeat_per_sample(v, group_size) for k, v in fields.items()}
    result = reward_set(
        rep_prompts, completions, completion_ids=completion_id_lists(ids_bn, mask_bn), **rep_fields
    )
    lengths = mask_bn.sum(axis=1)
    last = np.take_along_axis(ids_bn, np.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    truncated = (lengths == ids_bn.shape[1]) & ~np.isin(last, list(stop_ids))
    return ScoredRollout(
        rep_prompts,
        completions,
        np.asarray(result.total, np.float32),
        {k: np.asarray(v, np.float32) for k, v in result.columns.items()},
        lengths,
        truncated,
    )
