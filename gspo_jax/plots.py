"""End-of-run plots: workdir/plots/*.png drawn from metrics.jsonl.

Lines without a phase (or with phase "rl") feed the RL curves; other phases (e.g. "warmstart")
appear only on the eval-accuracy plot, against their own step count.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gspo_jax.metrics import is_number, is_rl_phase, read_metrics

REWARD_KEYS = ("reward/mean", "reward/std")
EVAL_ACCURACY_KEY = "eval/accuracy"
CLIP_FRACTION_KEYS = ("clip_frac/seq", "clip_frac/token")
COMPLETION_LENGTH_KEY = "completion_len/mean"
_MINIBATCH_KEY = re.compile(r"^(?P<base>.+)/mb(?P<index>\d+)$")


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records holding a numeric `key`, in file order."""
    points = [(r["step"], float(r[key])) for r in records if is_number(r.get(key))]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values)


def _new_axes(title: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _save(figure, axes, path: Path, written: list[Path]) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    written.append(path)


def plot_metrics(workdir: str | os.PathLike) -> list[Path]:
    """Writes workdir/plots/*.png from metrics.jsonl; returns the files written.

    Plots: reward mean (with a +-std band when "reward/std" is logged), eval accuracy (RL eval
    as a line, other phases such as a warm start as labelled markers), clip fractions (sequence
    and token), completion length, and one plot per per-minibatch series ("<name>/mb<i>" keys).
    A plot whose keys were never logged is skipped.
    """
    workdir = Path(workdir)
    records = read_metrics(workdir)
    rl = [r for r in records if is_rl_phase(r.get("phase"))]
    out = workdir / "plots"
    written: list[Path] = []
    if not records:
        return written
    out.mkdir(parents=True, exist_ok=True)

    with_reward = [r for r in rl if is_number(r.get(REWARD_KEYS[0]))]
    if with_reward:
        figure, axes = _new_axes("Reward", "reward")
        steps, mean = series(with_reward, REWARD_KEYS[0])
        axes.plot(steps, mean, label="mean")
        if all(is_number(r.get(REWARD_KEYS[1])) for r in with_reward):
            _, std = series(with_reward, REWARD_KEYS[1])
            axes.fill_between(steps, mean - std, mean + std, alpha=0.25, label="+- std")
        _save(figure, axes, out / "reward.png", written)

    phases = sorted({r["phase"] for r in records if not is_rl_phase(r.get("phase"))})
    eval_by_phase = {
        p: series([r for r in records if r.get("phase") == p], EVAL_ACCURACY_KEY) for p in phases
    }
    rl_eval = series(rl, EVAL_ACCURACY_KEY)
    if rl_eval[0].size or any(s.size for s, _ in eval_by_phase.values()):
        figure, axes = _new_axes("Eval accuracy", "accuracy")
        if rl_eval[0].size:
            axes.plot(*rl_eval, marker="o", label="RL")
        markers = "s^vD*"
        for i, (phase, (s, v)) in enumerate(eval_by_phase.items()):
            if s.size:
                axes.plot(
                    s, v, linestyle="--", marker=markers[i % len(markers)], label=f"{phase} (own step count)"
                )
        _save(figure, axes, out / "eval_accuracy.png", written)

    clip = [(key, series(rl, key)) for key in CLIP_FRACTION_KEYS]
    if any(s.size for _, (s, _v) in clip):
        figure, axes = _new_axes("Clipped fraction", "fraction clipped")
        for key, (s, v) in clip:
            if s.size:
                axes.plot(s, v, label=key)
        _save(figure, axes, out / "clip_fraction.png", written)

    steps, length = series(rl, COMPLETION_LENGTH_KEY)
    if steps.size:
        figure, axes = _new_axes("Completion length", "tokens")
        axes.plot(steps, length, label="mean")
        _save(figure, axes, out / "completion_length.png", written)

    minibatch_series: dict[str, dict[int, str]] = {}
    for key in dict.fromkeys(k for r in rl for k in r):
        match = _MINIBATCH_KEY.match(key)
        if match:
            minibatch_series.setdefault(match["base"], {})[int(match["index"])] = key
    for base, keys in sorted(minibatch_series.items()):
        figure, axes = _new_axes(f"{base} per minibatch", base)
        for index in sorted(keys):
            axes.plot(*series(rl, keys[index]), label=f"minibatch {index}")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_")
        _save(figure, axes, out / f"minibatch_{name}.png", written)
    return written
