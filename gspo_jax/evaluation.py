"""Greedy evaluation on the held-out prompts: accuracy and mean reward.

A prompt counts as solved when the task's exact verifier accepts the greedy completion (built-in tasks)
or, for file data, when its total reward reaches `correct_threshold`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from gspo_jax.data import PromptBatch
from gspo_jax.rollout import completion_id_lists, completion_texts
from gspo_jax.sharding import sum_over_hosts


def evaluate(
    generate: Callable[[PromptBatch], tuple[np.ndarray, np.ndarray]],
    batches: list[PromptBatch],
    tokenizer,
    reward_set,
    stop_ids,
    *,
    is_correct: Callable[[str, str], bool] | None,
    correct_threshold: float = 1.0,
) -> dict[str, float]:
    """generate(batch) -> (completion ids [N, T], mask [N, T]) of one greedy sample per prompt."""
    solved, rewards = [], []
    for batch in batches:
        ids, mask = generate(batch)
        keep = np.asarray(batch.valid, bool)
        texts = completion_texts(tokenizer, ids, mask, stop_ids)
        # The same arguments as training's scoring (rollout.score_rollout), completion_ids included.
        result = reward_set(
            batch.prompts, texts, completion_ids=completion_id_lists(ids, mask), **batch.fields
        )
        total = np.asarray(result.total, np.float32)
        if is_correct is not None:
            correct = np.array([is_correct(t, a) for t, a in zip(texts, batch.fields["answer"])])
        else:
            correct = total >= correct_threshold
        solved.append(correct[keep])
        rewards.append(total[keep])
    if not batches:
        return {}
    solved_all, rewards_all = np.concatenate(solved), np.concatenate(rewards)
    # Each host evaluates its share of the prompts; totals are summed over hosts.
    num_solved, reward_sum, count = sum_over_hosts([solved_all.sum(), rewards_all.sum(), len(solved_all)])
    return {
        "eval/accuracy": float(num_solved / count),
        "eval/reward/mean": float(reward_sum / count),
        "eval/num_prompts": float(count),
    }
