"""Reward registry, built-in verifiers, weights, user functions by path, and error reporting."""

import math
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from gspo_jax import rewards
from gspo_jax.rewards import RewardFunctionError, RewardSet
from gspo_jax.train import ConfigError, validate_config

import micro_config
from configs.qwen_moe import get_config


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        ("The answer is \\boxed{1,234}.", "1234", 1.0),
        ("so x = 3.0", "3", 1.0),
        ("first 12, then 15", "15", 1.0),  # last number wins
        ("first 12, then 15", "12", 0.0),
        ("\\boxed{7}, not 8", "7", 1.0),  # boxed beats the last number
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # nested braces inside boxed
        ("\\boxed{3/4}", "0.75", 1.0),
        ("total: -3", "-3", 1.0),
        ("1,234", "1,234", 1.0),
        ("72", "48 + 24 = 72 #### 72", 1.0),  # GSM8K-style answer: its last number
        ("\\boxed{x+1}", "x + 1", 1.0),  # non-numeric: text without spaces
        ("\\boxed{x+2}", "x + 1", 0.0),
        ("4", "3", 0.0),
        ("no number here", "3", 0.0),
        ("3.5", "3", 0.0),
        ("5", 5, 1.0),  # answers from JSON may be ints
    ],
)
def test_math_answer(completion, answer, expected):
    assert rewards.math_answer(["p"], [completion], answer=[answer]) == [expected]


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<answer>5</answer>", 1.0),
        ("think... <answer>\n5\n</answer> done", 1.0),
        ("\\boxed{5}", 1.0),
        ("5", 0.0),
        ("<answer></answer>", 0.0),
        ("\\boxed{}", 0.0),
        ("<answer>5", 0.0),
    ],
)
def test_format_default_pattern(completion, expected):
    assert rewards.format_reward(["p"], [completion]) == [expected]


def test_weighted_total_columns_and_metrics():
    reward_set = RewardSet.from_config("sort_digits, format", "2, 0.5")
    completions = ["12345", "12354", "<answer>1</answer>", "1234"]
    out = reward_set(["31425="] * 4, completions, answer=["12345"] * 4)
    sort_col = np.array([1.0, 3 / 5, 0.0, 0.5 * 4 / 5])  # hand partial credit
    format_col = np.array([0.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(out.columns["sort_digits"], sort_col, rtol=1e-6)
    np.testing.assert_allclose(out.columns["format"], format_col)
    np.testing.assert_allclose(out.total, 2 * sort_col + 0.5 * format_col, rtol=1e-6)
    assert out.total.dtype == np.float32
    metrics = out.metrics()
    assert metrics["reward/sort_digits/mean"] == pytest.approx(sort_col.mean())
    assert metrics["reward/format/mean"] == pytest.approx(0.25)
    assert reward_set.names == ("sort_digits", "format") and reward_set.weights == (2.0, 0.5)


def test_default_weights_are_one_and_lists_accepted():
    reward_set = RewardSet.from_config(["math_answer", "format"])
    out = reward_set(["q"], ["\\boxed{4}"], answer=["4"])
    assert out.total[0] == pytest.approx(2.0)


@pytest.mark.parametrize("as_config_dict", [False, True])
def test_fn_kwargs_bind_a_custom_format_pattern(as_config_dict):
    fn_kwargs = {"format": {"pattern": r"^\d+$"}}
    if as_config_dict:
        fn_kwargs = ml_collections.ConfigDict(fn_kwargs)
    reward_set = RewardSet.from_config("format", fn_kwargs=fn_kwargs)
    out = reward_set(["q", "q"], ["123", "<answer>1</answer>"])
    np.testing.assert_array_equal(out.columns["format"], [1.0, 0.0])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `my_rewards_mod` importable from a temporary directory."""
    (tmp_path / "my_rewards_mod.py").write_text(
        textwrap.dedent("""
        def length(completions, **kwargs):
            assert "completion_ids" in kwargs and "answer" in kwargs
            return [float(len(c)) for c in completions]

        def only_named(prompts, completions, answer):
            return [float(c == a) for c, a in zip(completions, answer)]

        def needs_label(completions, label):
            return [0.0 for _ in completions]

        def bad_on_b(prompts, completions, **kwargs):
            return [1.0 / (c != "b") for c in completions]

        def wrong_length(completions, **kwargs):
            return [1.0]

        def gives_nan(completions, **kwargs):
            return [1.0, float("nan")][:len(completions)]

        def gives_none(completions, **kwargs):
            return [None for _ in completions]

        def gives_text(completions, **kwargs):
            return ["high" for _ in completions]

        def batch_only_failure(completions, **kwargs):
            if len(completions) > 1:
                raise RuntimeError("cannot batch")
            return [0.0]

        def no_completions(prompts):
            return [0.0 for _ in prompts]

        NOT_A_FUNCTION = 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_mod"
    sys.modules.pop("my_rewards_mod", None)


def test_user_function_by_import_path(user_module):
    reward_set = RewardSet.from_config([f"{user_module}:length", f"{user_module}:only_named"], [1.0, 10.0])
    out = reward_set(["a", "b"], ["xyz", "7"], completion_ids=[[1, 2, 3], [4]], answer=["0", "7"])
    np.testing.assert_allclose(out.columns[f"{user_module}:length"], [3.0, 1.0])
    np.testing.assert_allclose(out.columns[f"{user_module}:only_named"], [0.0, 1.0])
    np.testing.assert_allclose(out.total, [3.0, 11.0])


def test_register_reward_by_name():
    @rewards.register_reward("test_constant_reward", overwrite=True)
    def constant(prompts, completions, **fields):
        return [0.25] * len(completions)

    out = RewardSet.from_config("test_constant_reward")(["p"], ["c"])
    assert out.total[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("test_constant_reward", lambda prompts, completions: [0.0])


@pytest.mark.parametrize(
    "fns,weights,match",
    [
        ("math_anser", None, "unknown reward 'math_anser'"),
        ("no_such_module_xyz:fn", None, "cannot import module 'no_such_module_xyz'"),
        ("math,format", None, "unknown reward 'math'"),
        ("sort_digits,format", "1.0", r"1 reward weights .* 2 reward functions"),
        ("sort_digits", "heavy", "not a number"),
        ("format,format", None, "listed twice"),
        ("", None, "no reward functions"),
    ],
)
def test_config_errors_name_the_entry(fns, weights, match):
    with pytest.raises(ValueError, match=match):
        RewardSet.from_config(fns, weights)


def test_path_errors_name_the_entry(user_module):
    with pytest.raises(ValueError, match="has no function 'missing'"):
        RewardSet.from_config(f"{user_module}:missing")
    with pytest.raises(ValueError, match="has no function 'NOT_A_FUNCTION'"):
        RewardSet.from_config(f"{user_module}:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="must accept a `completions` argument"):
        RewardSet.from_config(f"{user_module}:no_completions")
    with pytest.raises(ValueError, match="not among the reward functions"):
        RewardSet.from_config("format", fn_kwargs={"fromat": {"pattern": "x"}})


def test_missing_column_is_reported_before_running(user_module):
    reward_set = RewardSet.from_config(f"{user_module}:needs_label")
    with pytest.raises(ValueError, match=r"needs the data column\(s\) \['label'\]"):
        reward_set.check_columns(["answer"])
    reward_set.check_columns(["label"])
    with pytest.raises(ValueError, match="'label'"):
        reward_set(["p"], ["c"], answer=["a"])


def test_raising_function_names_the_first_failing_sample(user_module):
    reward_set = RewardSet.from_config(f"{user_module}:bad_on_b")
    with pytest.raises(RewardFunctionError) as err:
        reward_set(["p0", "p1", "p2", "p3"], ["a", "a", "b", "b"])
    message = str(err.value)
    assert f"'{user_module}:bad_on_b'" in message and "ZeroDivisionError" in message
    assert "sample 2:" in message and "prompt='p2'" in message and "completion='b'" in message
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_long_texts_are_truncated_in_errors(user_module):
    reward_set = RewardSet.from_config(f"{user_module}:bad_on_b")
    long_prompt = "q" * 5000
    with pytest.raises(RewardFunctionError) as err:
        reward_set([long_prompt], ["b"])
    assert "q" * 200 + "..." in str(err.value) and "q" * 201 not in str(err.value)


def test_batch_only_failure_is_reported(user_module):
    reward_set = RewardSet.from_config(f"{user_module}:batch_only_failure")
    with pytest.raises(RewardFunctionError, match="every sample alone succeeded"):
        reward_set(["p", "p"], ["a", "b"])


@pytest.mark.parametrize(
    "fn,match",
    [
        ("wrong_length", "returned 1 values for 2 completions"),
        ("gives_nan", r"returned nan .* sample 1: prompt='p1', completion='y'"),
        ("gives_none", r"returned None .* sample 0: prompt='p0', completion='x'"),
        ("gives_text", r"returned 'high' .* sample 0"),
    ],
)
def test_bad_outputs_raise_reward_function_error(user_module, fn, match):
    reward_set = RewardSet.from_config(f"{user_module}:{fn}")
    with pytest.raises(RewardFunctionError, match=match):
        reward_set(["p0", "p1"], ["x", "y"])


def test_input_lengths_must_agree():
    with pytest.raises(ValueError, match="length 2"):
        RewardSet.from_config("sort_digits")(["p", "p"], ["1", "2"], answer=["1"])


def test_task_rewards_are_registered():
    assert {"math_answer", "format", "sort_digits", "addition"} <= set(rewards.registered_rewards())
    out = RewardSet.from_config("addition")(["47+85="], ["122"], answer=["132"])
    assert math.isclose(float(out.total[0]), 2 / 3, rel_tol=1e-6)


def test_reward_config_fn_kwargs_reach_the_function():
    cfg = get_config("tiny")
    cfg.reward.fns = "format,sort_digits"
    cfg.reward.fn_kwargs = {"format": {"pattern": r"^7$"}}
    out = RewardSet.from_reward_config(cfg.reward)(["q", "q"], ["7", "77"], answer=["7", "7"])
    # The default pattern matches neither completion; the bound one matches exactly "7".
    np.testing.assert_array_equal(out.columns["format"], [1.0, 0.0])


@pytest.mark.parametrize(
    "fn_kwargs,match",
    [
        ({"fromat": {"pattern": "x"}}, r"kwargs given for \['fromat'\], which are not among"),
        ({"format": {"patern": "x"}}, r"fn_kwargs\['format'\] names \['patern'\], which 'format' does not"),
        ({"format": "x"}, r"fn_kwargs\['format'\] must map argument names to values"),
    ],
)
def test_reward_config_fn_kwargs_errors_name_the_fix(fn_kwargs, match):
    cfg = micro_config.get_config()
    cfg.reward.fns = "format"
    cfg.reward.fn_kwargs = fn_kwargs
    with pytest.raises(ValueError, match=match):
        RewardSet.from_reward_config(cfg.reward)
    with pytest.raises(ConfigError, match=r"reward\.fn_kwargs: .*" + match):
        validate_config(cfg, num_devices=1)
