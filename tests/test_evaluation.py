"""Greedy evaluation calls reward functions exactly as training does."""

import numpy as np

from gspo_jax import rewards, rollout
from gspo_jax.data import PromptBatch
from gspo_jax.evaluation import evaluate
from gspo_jax.tokenizer import builtin_tokenizer

STOP = 2


def ids_length_reward(prompts, completions, completion_ids):
    """1.0 per generated token id (stop token included), so the value checks the ids passed."""
    del prompts, completions
    return [float(len(ids)) for ids in completion_ids]


def test_eval_passes_completion_ids_like_training():
    tok = builtin_tokenizer()
    rewards.register_reward("test_eval_ids_len", ids_length_reward, overwrite=True)
    reward_set = rewards.RewardSet.from_config("test_eval_ids_len")
    ids = np.array([[5, 6, STOP, 0], [7, 8, 9, 10]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
    batch = PromptBatch(
        prompt_ids=np.ones((2, 3), np.int32),
        prompt_mask=np.ones((2, 3), np.int32),
        prompts=["a", "b"],
        fields={},
        valid=np.array([True, True]),
    )
    out = evaluate(
        lambda b: (ids, mask), [batch], tok, reward_set, [STOP], is_correct=None, correct_threshold=4.0
    )
    # Lengths 3 and 4: the mean reward is 3.5 and only the second row reaches the threshold.
    assert out["eval/reward/mean"] == 3.5
    assert out["eval/accuracy"] == 0.5
    # Training's scoring sees the same ids for the same rows.
    scored = rollout.score_rollout(tok, reward_set, batch, 1, ids, mask, [STOP])
    np.testing.assert_array_equal(scored.rewards, [3.0, 4.0])
