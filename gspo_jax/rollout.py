"""What happens to a rollout between the sampler and the update: completions to text, rewards, the
training-length bucket and the trainer's [prompt | completion] batch layout.

(sampler.py generates tokens; generate.py is the command-line tool over it; this module is the
trainer's side.) Shape letters (BUILD_NOTES.md, "Shapes"): N prompts, G group size, B = N*G rows,
P prompt length, C completion length, T = P + C.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STEP_BUCKET_MIN = 8


def completion_texts(tokenizer, ids_bc: np.ndarray, mask_bc: np.ndarray, stop_ids) -> list[str]:
    """Decodes each row's generated tokens, without the stop token and the padding after it."""
    texts = []
    stop = set(int(s) for s in stop_ids)
    for ids, mask in zip(ids_bc, mask_bc):
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


@dataclasses.dataclass(frozen=True)
class TrainingLayout:
    """A rollout as the trainer scores it: each row is [left-padded prompt (P) | completion (C)].

    tokens_bt [B, T] int32; valid_bt [B, T] bool; completion_mask_bc [B, C] float32;
    sampler_logp_bc [B, C] the sampler's log-probs of the same tokens."""

    tokens_bt: jax.Array
    valid_bt: jax.Array
    completion_mask_bc: jax.Array
    sampler_logp_bc: jax.Array


def training_layout(prompt_ids_np, prompt_mask_np, sample, group_size: int, width: int) -> TrainingLayout:
    """Prompts [N, P] repeated G times (prompt-major, as the sampler's rows) next to the first `width`
    completion columns of `sample` (a sampler.SampleOutput with [B, max_new_tokens] arrays)."""
    completion_ids = sample.completion_ids[:, :width]
    completion_mask = sample.completion_mask[:, :width]
    tokens = jnp.concatenate([jnp.repeat(prompt_ids_np, group_size, axis=0), completion_ids], axis=1)
    valid = jnp.concatenate([jnp.repeat(prompt_mask_np, group_size, axis=0), completion_mask], axis=1)
    return TrainingLayout(
        tokens, valid.astype(bool), completion_mask.astype(jnp.float32), sample.logprobs[:, :width]
    )


@dataclasses.dataclass
class ScoredRollout:
    """Host-side results of one rollout for metrics and sample logs."""

    prompts: list[str]  # [B] as the model saw them (chat template, bos), one per row
    completions: list[str]
    rewards: np.ndarray  # [B] weighted total
    reward_columns: dict[str, np.ndarray]  # reward function -> [B] unweighted scores
    answers: list[Any] | None  # [B] the records' reference answers, when they have an "answer" column
    lengths: np.ndarray  # [B] completion tokens incl. the stop token
    truncated: np.ndarray  # [B] bool: hit max_new_tokens without a stop token

    def metrics(self) -> dict[str, float]:
        """Host-side metrics (reward mean / std are the advantages' global ones, losses.group_advantages)."""
        out = {
            "reward/max": float(np.max(self.rewards)),
            "completion_len/mean": float(np.mean(self.lengths)),
            "completion_len/max": float(np.max(self.lengths)),
            "completion/truncated_frac": float(np.mean(self.truncated)),
        }
        for name, column in self.reward_columns.items():
            out[f"reward/{name}/mean"] = float(np.mean(column))
        return out

    def samples(self, n: int) -> list[dict[str, Any]]:
        """The first n rows as JSON-ready dicts: prompt, completion, total reward, each function's
        score (rewards/<name>) and the reference answer when the records have one."""
        out = []
        for i in range(min(n, len(self.prompts))):
            sample = {
                "prompt": self.prompts[i],
                "completion": self.completions[i],
                "reward": float(self.rewards[i]),
            }
            sample.update({f"rewards/{name}": float(col[i]) for name, col in self.reward_columns.items()})
            if self.answers is not None:
                sample["answer"] = self.answers[i]
            out.append(sample)
        return out


def model_prompts(tokenizer, prompt_ids_np: np.ndarray, prompt_mask_np: np.ndarray) -> list[str]:
    """The prompts as the model saw them (chat template and special tokens included)."""
    return [tokenizer.decode(ids[m.astype(bool)].tolist()) for ids, m in zip(prompt_ids_np, prompt_mask_np)]


def score_rollout(
    tokenizer, reward_set, batch, group_size: int, ids_bc: np.ndarray, mask_bc: np.ndarray, stop_ids
):
    """Rewards for the B = N * G completions of a data.PromptBatch of N prompts (rows prompt-major)."""
    completions = completion_texts(tokenizer, ids_bc, mask_bc, stop_ids)
    rep_prompts = repeat_per_sample(batch.prompts, group_size)
    rep_fields = {k: repeat_per_sample(v, group_size) for k, v in batch.fields.items()}
    result = reward_set(
        rep_prompts, completions, completion_ids=completion_id_lists(ids_bc, mask_bc), **rep_fields
    )
    lengths = mask_bc.sum(axis=1)
    last = np.take_along_axis(ids_bc, np.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    truncated = (lengths == ids_bc.shape[1]) & ~np.isin(last, list(stop_ids))
    return ScoredRollout(
        repeat_per_sample(model_prompts(tokenizer, batch.prompt_ids, batch.prompt_mask), group_size),
        completions,
        np.asarray(result.total, np.float32),
        {k: np.asarray(v, np.float32) for k, v in result.columns.items()},
        rep_fields.get("answer"),
        lengths,
        truncated,
    )


COMPACT_ROWS = ("auto", "on", "off")


def use_row_compaction(setting: str, num_devices: int, backend: str) -> bool:
    """rollout.compact_rows -> Sampler(compact_rows=...). "auto": on a single CPU device, where decode
    is compute-bound and a step with fewer rows costs less; "on": on any single device."""
    if setting == "on" and num_devices > 1:
        raise ValueError(
            f"--config.rollout.compact_rows=on needs the rollout rows on one device, but the mesh has "
            f"{num_devices}: compacting batch-sharded rows would gather the KV cache across devices. "
            "Use compact_rows=auto or off."
        )
    return setting == "on" or (setting == "auto" and num_devices == 1 and backend == "cpu")


def config_errors(r) -> list[str]:
    """Problems with the `rollout.*` keys."""
    checks = (
        (
            r.group_size >= 2,
            "group_size",
            f"must be >= 2 (group advantages compare responses to the same prompt), got {r.group_size}",
        ),
        (r.prompts_per_step >= 1, "prompts_per_step", "must be >= 1"),
        (r.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
        (
            r.temperature > 0,
            "temperature",
            f"must be > 0 for RL (greedy rollouts make all G samples identical), got {r.temperature}",
        ),
        (0 < r.top_p <= 1, "top_p", f"must be in (0, 1], got {r.top_p}"),
        (r.top_k >= 0, "top_k", "must be >= 0 (0 = off)"),
        (
            r.compact_rows in COMPACT_ROWS,
            "compact_rows",
            f"must be one of {COMPACT_ROWS}, got {r.compact_rows!r}",
        ),
    )
    return [f"--config.rollout.{key}: {problem}" for ok, key, problem in checks if not ok]
