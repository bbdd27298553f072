"""Reward functions: a registry of built-in verifiers, user functions by import path, weights.

A reward function has the TRL signature

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

called with keyword arguments, one list entry per completion (N = prompts x group size):
`prompts[i]` is the prompt text completion i answers, `completions[i]` its decoded text up to eos,
and `fields` the record's other columns as lists aligned the same way (e.g. `answer=[...]`) plus
`completion_ids` (list of lists of token ids). A function receives only the arguments its
signature names, or all of them if it takes `**kwargs`; a keyword argument without a default
that names a column the data lacks is reported before anything runs (`RewardSet.check_columns`).

Config: `fns` is a list or comma-separated string of registered names (`math_answer`, `format`,
`sort_digits`, `addition`) or import paths `package.module:function`; `weights` has one float per
function (default 1.0 each); `fn_kwargs` maps a function's name to keyword arguments bound to it
(e.g. `{"format": {"pattern": r"^<answer>\\d+</answer>$"}}`; the config key `reward.fn_kwargs`,
set in a config file). The total reward is the weighted sum.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gspo_jax import tasks

RewardFn = Callable[..., Sequence[float]]
# Arguments every call provides, so a signature naming them asks for no data column.
_CALL_ARGUMENTS = ("prompts", "completions", "completion_ids")
_SHOWN_CHARS = 200

_REGISTRY: dict[str, RewardFn] = {}


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something other than one finite float per sample."""


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False):
    """Registers `fn` under `name` (usable as a decorator: `@register_reward("mine")`)."""

    def register(f: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not f and not overwrite:
            raise ValueError(
                f"a reward named {name!r} is already registered: pick another name or pass overwrite=True."
            )
        _REGISTRY[name] = f
        return f

    return register if fn is None else register(fn)


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------
# Built-in verifiers.

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_FRACTION = re.compile(r"^(-?[\d.]+)/([\d.]+)$")
_LATEX_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{(-?[\d.]+)\}\{([\d.]+)\}$")
DEFAULT_FORMAT_PATTERN = r"<answer>.+?</answer>|\\boxed\{.+?\}"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def parse_number(text: str) -> float | None:
    """A number written as `1,234`, `-3.0`, `3/4`, `\\frac{3}{4}` (spaces and `$` ignored)."""
    text = text.strip().replace(" ", "").replace("$", "")
    if fraction := _LATEX_FRACTION.match(text):
        sign, num, den = fraction.groups()
        text = f"{sign}{num}/{den}"
    if fraction := _FRACTION.match(text):
        num, den = (parse_number(part) for part in fraction.groups())
        return None if num is None or not den else num / den
    if _NUMBER.fullmatch(text):
        return float(text.replace(",", ""))
    return None


def extract_answer(text: str) -> str | None:
    """The last `\\boxed{...}` content if any, else the last number in `text`, else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _same_answer(predicted: str | None, answer: Any) -> bool:
    if predicted is None:
        return False
    gold_text = str(answer)
    gold = parse_number(gold_text)
    if gold is None:
        extracted = extract_answer(gold_text)  # e.g. GSM8K's "... #### 72"
        gold = parse_number(extracted) if extracted is not None else None
    value = parse_number(predicted)
    if gold is not None and value is not None:
        return abs(value - gold) <= 1e-6 * max(1.0, abs(gold))
    return predicted.replace(" ", "") == gold_text.strip().replace(" ", "")


@register_reward("math_answer")
def math_answer(prompts: list[str], completions: list[str], *, answer: list[Any], **fields) -> list[float]:
    """1.0 if the completion's answer equals `answer` numerically, else 0.0.

    The completion's answer is the last `\\boxed{...}` content, else its last number.
    `1,234` == `1234`, `3.0` == `3`, `\\frac{1}{2}` == `0.5` (relative tolerance 1e-6); a
    non-numeric boxed answer is compared as text with spaces removed.
    """
    del prompts, fields
    return [float(_same_answer(extract_answer(c), a)) for c, a in zip(completions, answer, strict=True)]


@register_reward("format")
def format_reward(
    prompts: list[str], completions: list[str], *, pattern: str = DEFAULT_FORMAT_PATTERN, **fields
) -> list[float]:
    """1.0 if `pattern` occurs in the completion (`re.search`, `.` matching newlines), else 0.0.

    The default accepts `<answer>...</answer>` or `\\boxed{...}` with non-empty content anywhere.
    Set another pattern with `fn_kwargs={"format": {"pattern": ...}}`; anchor it with `^...$`
    to demand the whole completion match.
    """
    del prompts, fields
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.search(c) is not None) for c in completions]


for _name in tasks.TASKS:
    register_reward(_name, tasks.get_task(_name).reward_fn)


# ---------------------------------------------------------------------------------------------
# Resolving config entries and running a weighted set.


def resolve_reward(spec: str) -> tuple[str, RewardFn]:
    """(metric name, function) for a registered name or a `package.module:function` path."""
    spec = spec.strip()
    if spec in _REGISTRY:
        return spec, _REGISTRY[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}: use a registered name {registered_rewards()} or an "
            "import path 'package.module:function'."
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"reward {spec!r}: cannot import module {module_name!r} ({e}). Make sure it is "
            "importable (installed or on PYTHONPATH) and written 'package.module:function'."
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(
            f"reward {spec!r}: module {module_name!r} has no function {attr!r}; check the name after the ':'."
        )
    return spec, fn  # named as the user wrote it, in metrics and errors


def _parse_list(value: str | Sequence[Any] | None) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _checked_kwargs(name: str, fn: RewardFn, kwargs: Any) -> dict[str, Any]:
    """fn_kwargs[name] as a dict, after checking that `fn` accepts each keyword."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(
            f"reward fn_kwargs[{name!r}] must map argument names to values, got {kwargs!r}: "
            f'write e.g. {{"{name}": {{"pattern": "..."}}}}.'
        )
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to check against
        return dict(kwargs)
    # Checked against the named parameters even when fn takes **fields (the built-ins do, to absorb
    # data columns): a misspelt keyword would otherwise vanish into **fields unnoticed.
    named = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(named))
    if unknown:
        raise ValueError(
            f"reward fn_kwargs[{name!r}] names {unknown}, which {name!r} does not take as named "
            f"parameters (it has {named}): fix the names, or add them to the function's signature."
        )
    return dict(kwargs)


def _shown(text: Any) -> str:
    text = str(text)
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


@dataclasses.dataclass(frozen=True)
class RewardOutput:
    """total: [N] float32 weighted sum; columns: function name -> [N] float32 raw rewards."""

    total: np.ndarray
    columns: dict[str, np.ndarray]

    def metrics(self) -> dict[str, float]:
        """`reward/<name>/mean` for each function."""
        return {f"reward/{name}/mean": float(col.mean()) for name, col in self.columns.items()}


@dataclasses.dataclass(frozen=True)
class _BoundReward:
    name: str
    fn: RewardFn
    weight: float
    takes_all: bool  # the signature has **kwargs
    accepted: frozenset[str]
    required_columns: frozenset[str]

    @classmethod
    def create(cls, name: str, fn: RewardFn, weight: float) -> _BoundReward:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature: pass everything
            return cls(name, fn, weight, True, frozenset(), frozenset())
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        accepted = frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not takes_all and "completions" not in accepted:
            raise ValueError(
                f"reward {name!r} must accept a `completions` argument: write it as "
                "fn(prompts, completions, **fields) -> list[float]."
            )
        required = frozenset(
            p.name
            for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is p.empty
            and p.name not in _CALL_ARGUMENTS
        )
        return cls(name, fn, weight, takes_all, accepted, required)

    def call(self, arguments: Mapping[str, list[Any]]) -> Any:
        if not self.takes_all:
            arguments = {k: v for k, v in arguments.items() if k in self.accepted}
        return self.fn(**arguments)


class RewardSet:
    """Named reward functions and their weights, called on a batch of completions."""

    def __init__(self, rewards: Sequence[_BoundReward]):
        self._rewards = tuple(rewards)

    @classmethod
    def from_config(
        cls,
        fns: str | Sequence[str],
        weights: str | Sequence[float] | None = None,
        fn_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> RewardSet:
        """Builds the set from config values; raises ValueError naming any bad entry."""
        specs = _parse_list(fns)
        if not specs:
            raise ValueError(
                "no reward functions given: set the reward fns to e.g. 'math_answer' or 'sort_digits,format'."
            )
        raw_weights = _parse_list(weights) or [1.0] * len(specs)
        if len(raw_weights) != len(specs):
            raise ValueError(
                f"{len(raw_weights)} reward weights {raw_weights} for {len(specs)} reward "
                f"functions {specs}: give one weight per function, in the same order."
            )
        if hasattr(fn_kwargs, "to_dict"):  # an ml_collections.ConfigDict
            fn_kwargs = fn_kwargs.to_dict()
        fn_kwargs = dict(fn_kwargs or {})
        rewards, names = [], []
        for spec, raw_weight in zip(specs, raw_weights):
            name, fn = resolve_reward(spec)
            if name in names:
                raise ValueError(f"reward {name!r} is listed twice: list each function once.")
            try:
                weight = float(raw_weight)
            except (TypeError, ValueError):
                raise ValueError(f"reward weight {raw_weight!r} for {name!r} is not a number.") from None
            if not math.isfinite(weight):
                raise ValueError(f"reward weight for {name!r} must be finite, got {weight}.")
            if name in fn_kwargs:
                fn = functools.partial(fn, **_checked_kwargs(name, fn, fn_kwargs.pop(name)))
            names.append(name)
            rewards.append(_BoundReward.create(name, fn, weight))
        if fn_kwargs:
            raise ValueError(
                f"reward kwargs given for {sorted(fn_kwargs)}, which are not among the reward "
                f"functions {names}: fix the names or add the functions."
            )
        return cls(rewards)

    @classmethod
    def from_reward_config(cls, cfg_reward: Any) -> RewardSet:
        """The set a run's `reward` config section describes (keys fns, weights, fn_kwargs)."""
        return cls.from_config(cfg_reward.fns, cfg_reward.weights or None, cfg_reward.get("fn_kwargs"))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self._rewards)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(r.weight for r in self._rewards)

    def check_columns(self, columns: Sequence[str]) -> None:
        """Raises ValueError if a function needs a data column that `columns` lacks."""
        for r in self._rewards:
            missing = sorted(r.required_columns - set(columns))
            if missing:
                raise ValueError(
                    f"reward {r.name!r} needs the data column(s) {missing}, but the records "
                    f"have {sorted(columns)}: add them to every record or drop the reward."
                )

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **fields: Sequence[Any],
    ) -> RewardOutput:
        """Rewards for N completions; every argument is a list of length N."""
        n = len(completions)
        arguments = {
            "prompts": list(prompts),
            "completions": list(completions),
            **{k: list(v) for k, v in fields.items()},
        }
        if completion_ids is not None:
            arguments["completion_ids"] = [list(ids) for ids in completion_ids]
        bad = {k: len(v) for k, v in arguments.items() if len(v) != n}
        if bad:
            raise ValueError(f"reward inputs must all have length {n} (completions); got {bad}.")
        self.check_columns(list(arguments))
        columns = {r.name: self._run(r, arguments, n) for r in self._rewards}
        total = np.zeros(n, np.float32)
        for r in self._rewards:
            total += np.float32(r.weight) * columns[r.name]
        return RewardOutput(total=total, columns=columns)

    @staticmethod
    def _run(reward: _BoundReward, arguments: Mapping[str, list[Any]], n: int) -> np.ndarray:
        def sample(i: int) -> str:
            return (
                f"sample {i}: prompt={_shown(arguments['prompts'][i])}, "
                f"completion={_shown(arguments['completions'][i])}"
            )

        try:
            result = reward.call(arguments)
        except Exception as batch_error:  # noqa: BLE001 - any user error gets located below
            for i in range(n):
                try:
                    reward.call({k: v[i : i + 1] for k, v in arguments.items()})
                except Exception as e:  # noqa: BLE001
                    raise RewardFunctionError(
                        f"reward function {reward.name!r} raised {type(e).__name__}: {e} on {sample(i)}"
                    ) from e
            raise RewardFunctionError(
                f"reward function {reward.name!r} raised {type(batch_error).__name__}: "
                f"{batch_error} on the batch of {n}, though every sample alone succeeded."
            ) from batch_error
        try:
            values = list(result)
        except TypeError:
            raise RewardFunctionError(
                f"reward function {reward.name!r} returned {type(result).__name__}, not a list of {n} floats."
            ) from None
        if len(values) != n:
            raise RewardFunctionError(
                f"reward function {reward.name!r} returned {len(values)} values for {n} "
                "completions: return exactly one float per completion."
            )
        column = np.empty(n, np.float32)
        for i, value in enumerate(values):
            try:
                column[i] = float(value)
            except (TypeError, ValueError):
                column[i] = np.nan
            if not np.isfinite(column[i]):
                raise RewardFunctionError(
                    f"reward function {reward.name!r} returned {value!r} (need a finite float) "
                    f"for {sample(i)}"
                )
        return column


def config_errors(reward_cfg) -> list[str]:
    """Problems with the `reward.*` keys (functions resolvable, one finite weight each)."""
    try:
        RewardSet.from_config(reward_cfg.fns, reward_cfg.weights or None, reward_cfg.get("fn_kwargs"))
    except (ValueError, ImportError) as e:
        return [f"--config.reward.fns / reward.weights / reward.fn_kwargs: {e}"]
    return []
