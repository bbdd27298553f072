"""Built-in verifiable tasks for offline runs: a prompt generator and an exact verifier each.

A task's problems are short digit strings a ~1M-parameter model learns in minutes, e.g.
`sort_digits`: `31425=` -> `12345`, `addition`: `47+85=` -> `132`, and one with long, step-by-step
completions, `running_sum`: `3+5+9=` -> `3,8,17`. Completions are scored on
the decoded text up to (not including) eos, with surrounding whitespace ignored.

Train and eval are disjoint by construction: every possible problem belongs to exactly one split,
chosen by a stable hash of its prompt text (1 problem in `EVAL_HASH_MODULUS` is eval), so no
seed or size can leak eval problems into training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Sequence

import numpy as np

SPLITS = ("train", "eval")
EVAL_HASH_MODULUS = 10
# Failed draws allowed per requested distinct eval problem before giving up (small problem spaces).
_EVAL_DRAWS_PER_RECORD = 50


def split_of(prompt: str) -> str:
    """The split ("train" or "eval") a problem belongs to, from a stable hash of its prompt."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_HASH_MODULUS == 0 else "train"


def positional_credit(completion: str, answer: str, *, align: str) -> float:
    """Partial credit in [0, 1] for a digit-string answer, position by position.

    - exact match (after stripping whitespace): 1.0;
    - right length: the fraction of positions that match (at most (n-1)/n when not exact);
    - wrong length (missing, extra or malformed output): half the number of matching positions
      over the longer of the two lengths, so it stays at or below 0.5 and rambling past the
      answer costs credit.
    `align="left"` compares from the first character, `"right"` from the last (units digit).
    """
    text = completion.strip()
    if align == "right":
        text, answer = text[::-1], answer[::-1]
    return _sequence_credit(text, answer)


def _sequence_credit(items: Sequence, target: Sequence) -> float:
    """`positional_credit`'s rule over any two sequences (characters, or the steps of a chain)."""
    if list(items) == list(target):
        return 1.0
    matches = sum(a == b for a, b in zip(items, target))
    if len(items) == len(target):
        return matches / len(target)
    return 0.5 * matches / max(len(items), len(target))


def stepwise_credit(completion: str, answer: str) -> float:
    """Partial credit in [0, 1] for a comma-separated chain of steps, step by step.

    `positional_credit`'s rule with whole steps in place of characters: 1.0 exact, else the
    fraction of steps right when the number of steps is right, at most 0.5 otherwise.
    """
    return _sequence_credit(completion.strip().split(","), answer.split(","))


@dataclasses.dataclass(frozen=True)
class Task:
    """A verifiable task: problems from `sample_problem`, partial credit from `score`.

    sample_problem: rng -> (prompt, answer), answers being the exact target completion text.
    score: (completion, answer) -> partial credit in [0, 1], 1.0 exactly when correct.
    max_completion_tokens: tokens the longest correct completion needs with the built-in
      tokenizer, eos included (a hint for the sampler's budget).
    """

    name: str
    sample_problem: Callable[[np.random.Generator], tuple[str, str]]
    score: Callable[[str, str], float]
    max_completion_tokens: int

    def records(self, split: str, seed: int, n: int) -> list[dict[str, str]]:
        """`n` records {"prompt", "answer"} of `split`, the same for the same (split, seed, n).

        Train records are drawn with replacement; eval records are distinct problems (an eval
        set with repeats would weigh some problems twice).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if n < 0:
            raise ValueError(f"number of records must be >= 0, got {n}.")
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        records: list[dict[str, str]] = []
        seen: set[str] = set()
        draws_left = _EVAL_DRAWS_PER_RECORD * n + 1000
        while len(records) < n:
            if draws_left == 0:
                raise ValueError(
                    f"task {self.name!r} has only {len(records)} distinct eval problems here, "
                    f"fewer than the {n} asked for: lower the eval size (data.eval_size) or "
                    "make the problems bigger (e.g. data.task_kwargs.num_digits)."
                )
            draws_left -= 1
            prompt, answer = self.sample_problem(rng)
            if split_of(prompt) != split or (split == "eval" and prompt in seen):
                continue
            seen.add(prompt)
            records.append({"prompt": prompt, "answer": answer})
        return records

    def reward_fn(
        self, prompts: list[str], completions: list[str], *, answer: list[str], **fields
    ) -> list[float]:
        """Partial-credit reward in the reward signature of `gspo_jax.rewards`."""
        del prompts, fields
        return [self.score(c, str(a)) for c, a in zip(completions, answer, strict=True)]

    def is_correct(self, completion: str, answer: str) -> bool:
        """Exact correctness (for eval accuracy): the stripped completion equals the answer."""
        return completion.strip() == str(answer)

    def supervised_examples(self, seed: int, n: int) -> list[tuple[str, str]]:
        """(prompt, target completion) pairs from the train split for a supervised warm start.

        Targets carry no eos: append the tokenizer's eos token when building sequences.
        """
        return [(r["prompt"], r["answer"]) for r in self.records("train", seed, n)]


def _check_num_digits(num_digits: int, upper: int) -> None:
    if not isinstance(num_digits, int) or not 1 <= num_digits <= upper:
        raise ValueError(f"num_digits must be an integer in [1, {upper}], got {num_digits!r}.")


def sort_digits_task(num_digits: int = 5) -> Task:
    """Sort `num_digits` random digits (repeats allowed): `31425=` -> `12345`.

    Partial credit (`positional_credit`, left aligned): 1.0 exact, else the fraction of
    positions holding the right digit; a wrong-length answer scores at most 0.5.
    """
    _check_num_digits(num_digits, 64)

    def sample_problem(rng: np.random.Generator) -> tuple[str, str]:
        digits = rng.integers(0, 10, size=num_digits)
        return "".join(map(str, digits)) + "=", "".join(map(str, np.sort(digits)))

    def score(completion: str, answer: str) -> float:
        return positional_credit(completion, answer, align="left")

    return Task("sort_digits", sample_problem, score, max_completion_tokens=num_digits + 1)


def addition_task(num_digits: int = 2) -> Task:
    """Add two random integers of up to `num_digits` digits each: `47+85=` -> `132`.

    Partial credit (`positional_credit`, right aligned, i.e. from the units digit): 1.0 exact,
    else the fraction of digits right; a wrong-length answer scores at most 0.5.
    """
    _check_num_digits(num_digits, 18)
    high = 10**num_digits

    def sample_problem(rng: np.random.Generator) -> tuple[str, str]:
        a, b = (int(x) for x in rng.integers(0, high, size=2))
        return f"{a}+{b}=", str(a + b)

    def score(completion: str, answer: str) -> float:
        return positional_credit(completion, answer, align="right")

    return Task("addition", sample_problem, score, max_completion_tokens=num_digits + 2)


def running_sum_task(num_terms: int = 12) -> Task:
    """Add `num_terms` random digits, writing every partial sum: `3+5+9=` -> `3,8,17`.

    The last step is the final answer, so a completion is tens of tokens long (about 3 per term)
    and its correctness hangs on every step: a slip early on carries into all later sums.
    Partial credit (`stepwise_credit`): the fraction of partial sums right (at most 0.5 when the
    number of steps is wrong); exact correctness needs the whole chain.
    """
    if not isinstance(num_terms, int) or not 2 <= num_terms <= 40:
        raise ValueError(f"num_terms must be an integer in [2, 40], got {num_terms!r}.")

    def sample_problem(rng: np.random.Generator) -> tuple[str, str]:
        digits = rng.integers(0, 10, size=num_terms)
        return "+".join(map(str, digits)) + "=", ",".join(map(str, np.cumsum(digits)))

    # Each partial sum has at most 3 digits, and one comma separates steps; plus eos.
    return Task("running_sum", sample_problem, stepwise_credit, max_completion_tokens=4 * num_terms)


TASKS: dict[str, Callable[..., Task]] = {
    "sort_digits": sort_digits_task,
    "addition": addition_task,
    "running_sum": running_sum_task,
}


def get_task(name: str, **kwargs) -> Task:
    """The built-in task `name` built with `kwargs` (e.g. `num_digits=4`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {sorted(TASKS)}.")
    factory = TASKS[name]
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} got unknown options {unknown}: it accepts {sorted(accepted)}.")
    return factory(**kwargs)
