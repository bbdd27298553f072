"""Built-in tasks: deterministic generators, disjoint splits, exact verifiers, partial credit."""

import hashlib
import re

import pytest

from gspo_jax import tasks


def test_sort_records_are_correct_and_deterministic():
    task = tasks.get_task("sort_digits")
    records = task.records("train", seed=3, n=300)
    assert records == task.records("train", seed=3, n=300)
    assert records != task.records("train", seed=4, n=300)
    for r in records:
        assert re.fullmatch(r"\d{5}=", r["prompt"])
        assert r["answer"] == "".join(sorted(r["prompt"][:-1]))


def test_addition_records_are_correct():
    task = tasks.get_task("addition", num_digits=3)
    for r in task.records("train", seed=0, n=300):
        match = re.fullmatch(r"(\d{1,3})\+(\d{1,3})=", r["prompt"])
        assert match
        assert r["answer"] == str(int(match.group(1)) + int(match.group(2)))


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_train_and_eval_are_disjoint(name):
    task = tasks.get_task(name)
    train = {r["prompt"] for seed in range(3) for r in task.records("train", seed, 3000)}
    evals = [r["prompt"] for r in task.records("eval", 0, 200)]
    assert len(evals) == len(set(evals)) == 200  # eval problems are distinct
    assert not train & set(evals)
    assert all(tasks.split_of(p) == "eval" for p in evals)


def test_split_is_a_stable_hash_of_the_prompt():
    # The documented rule (blake2b-64 of the UTF-8 prompt, little endian, mod 10 == 0 -> eval),
    # which unlike Python's hash() gives the same split in every process.
    all_two_digit = [f"{a}{b}=" for a in range(10) for b in range(10)]
    for prompt in all_two_digit:
        digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
        expected = "eval" if int.from_bytes(digest, "little") % 10 == 0 else "train"
        assert tasks.split_of(prompt) == expected
    n_eval = sum(tasks.split_of(p) == "eval" for p in all_two_digit)
    assert 0 < n_eval < 30  # about 1 in 10


def test_too_small_eval_space_names_the_fix():
    task = tasks.get_task("sort_digits", num_digits=2)  # 100 problems, about 10 in eval
    with pytest.raises(ValueError, match="eval_size"):
        task.records("eval", 0, 200)


@pytest.mark.parametrize(
    "completion,score",
    [
        ("12345", 1.0),
        (" 12345\n", 1.0),  # surrounding whitespace ignored
        ("12354", 3 / 5),  # right length, positions 4 and 5 wrong
        ("54321", 1 / 5),  # only the middle digit in place
        ("1234", 0.5 * 4 / 5),  # wrong length: half of 4 matches over 5
        ("123456", 0.5 * 5 / 6),
        ("1234512345", 0.5 * 5 / 10),
        ("", 0.0),
        ("abcde", 0.0),
    ],
)
def test_sort_partial_credit(completion, score):
    task = tasks.get_task("sort_digits")
    assert task.reward_fn(["31425="], [completion], answer=["12345"]) == pytest.approx([score])
    assert task.is_correct(completion, "12345") == (score == 1.0)


@pytest.mark.parametrize(
    "completion,score",
    [
        ("132", 1.0),
        ("122", 2 / 3),  # tens digit wrong
        ("032", 2 / 3),
        ("32", 0.5 * 2 / 3),  # units and tens right, hundreds missing
        ("1320", 0.0),  # right-aligned: 0 vs 2, 2 vs 3, 3 vs 1 all differ
        ("x", 0.0),
    ],
)
def test_addition_partial_credit(completion, score):
    task = tasks.get_task("addition")
    assert task.reward_fn(["47+85="], [completion], answer=["132"]) == pytest.approx([score])
    assert task.is_correct(completion, "132") == (score == 1.0)


def test_running_sum_records_write_every_partial_sum():
    task = tasks.get_task("running_sum", num_terms=7)
    for r in task.records("train", seed=0, n=300):
        assert re.fullmatch(r"(\d\+){6}\d=", r["prompt"])
        terms = [int(c) for c in r["prompt"][:-1].split("+")]
        assert r["answer"] == ",".join(str(sum(terms[: i + 1])) for i in range(7))
    answer = ",".join(str(9 * i) for i in range(1, 41))  # the longest chain: 40 nines
    assert tasks.get_task("running_sum", num_terms=40).max_completion_tokens >= len(answer) + 1


@pytest.mark.parametrize(
    "completion,score",
    [
        ("3,8,17", 1.0),
        (" 3,8,17\n", 1.0),
        ("3,9,18", 1 / 3),  # a slip at step 2 carries into step 3
        ("3,8,18", 2 / 3),
        ("3,8", 0.5 * 2 / 3),  # a step missing
        ("3,8,17,20", 0.5 * 3 / 4),  # an extra step
        ("38,17", 0.0),  # steps run together: compared from the left, no step lines up
        ("", 0.0),
    ],
)
def test_running_sum_partial_credit_is_per_step(completion, score):
    task = tasks.get_task("running_sum")
    assert task.reward_fn(["3+5+9="], [completion], answer=["3,8,17"]) == pytest.approx([score])
    assert task.is_correct(completion, "3,8,17") == (score == 1.0)


def test_max_completion_tokens_and_supervised_examples():
    sort4 = tasks.get_task("sort_digits", num_digits=4)
    assert sort4.max_completion_tokens == 5  # 4 digits + eos
    assert tasks.get_task("addition", num_digits=2).max_completion_tokens == 4  # 99+99=198, eos
    pairs = sort4.supervised_examples(seed=1, n=50)
    assert pairs == [(r["prompt"], r["answer"]) for r in sort4.records("train", 1, 50)]
    assert all(target == "".join(sorted(prompt[:-1])) for prompt, target in pairs)


def test_bad_task_name_and_options():
    with pytest.raises(ValueError, match="unknown task 'sortt'"):
        tasks.get_task("sortt")
    with pytest.raises(ValueError, match="num_digit"):
        tasks.get_task("sort_digits", num_digit=3)
    with pytest.raises(ValueError, match="num_digits"):
        tasks.get_task("addition", num_digits=0)
    with pytest.raises(ValueError, match=r"num_terms must be an integer in \[2, 40\]"):
        tasks.get_task("running_sum", num_terms=1)
    with pytest.raises(ValueError, match="split"):
        tasks.get_task("addition").records("test", 0, 1)
