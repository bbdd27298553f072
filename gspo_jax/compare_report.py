"""The report of an algorithm comparison (gspo_jax.compare): report.json, report.md and plots/*.png.

Input: for each arm (e.g. "gspo", "grpo") and seed, the run's metrics.jsonl records
(`gspo_jax.metrics.read_metrics`) and its wall time. Every statistic over seeds is a numpy mean,
standard deviation (ddof=0), min and max of one number per seed. Only metric keys that some run
logged are reported: a diagnostic nobody logged becomes an empty section with a note, never an error.

Definitions (written into the report too):
  train time    cumulative `step_time_s` of the RL steps (sampling, rewards, updates; evaluation,
                warm start and checkpoints excluded; the first step, which compiles, counted at the
                median step time), the x axis of the "vs wall time" curves.
  collapse      an episode in which held-out accuracy falls more than COLLAPSE_DROP below its
                running best (over this run's earlier RL evals, step 0 included), or in which the
                reward's trailing mean over REWARD_WINDOW steps falls more than COLLAPSE_DROP below
                its running best; an episode ends when the curve is back within COLLAPSE_DROP.
                A step with skipped (non-finite) updates counts as one event, and so does a run
                stopped early.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gspo_jax.metrics import is_number, is_rl_phase
from gspo_jax.plots import series

COLLAPSE_DROP = 0.15
REWARD_WINDOW = 10
ACCURACY_KEY = "eval/accuracy"
REWARD_KEY = "reward/mean"
CLIP_KEYS = ("clip_frac/token", "clip_frac/seq")
VOLATILITY_KEY = "routing/volatility"
REPLAY_VOLATILITY_KEY = "routing/replay_volatility"
_VOLATILITY_LAYER = re.compile(r"^routing/volatility_layer(\d+)$")
_RATIO_BIN = re.compile(r"^ratio_len/bin(\d+)_(var_token_logratio_sum|var_seq_logratio|count|max_len)$")

# (summary key, table heading): the columns of report.md's main table, in order.
TABLE_COLUMNS = (
    ("eval_start", "eval acc. at RL start"),
    ("eval_final", "final eval acc."),
    ("eval_best", "best eval acc."),
    ("reward_final", "final reward"),
    ("clip_frac_token", "clip frac. token"),
    ("clip_frac_seq", "clip frac. seq"),
    ("routing_volatility", "routing volatility"),
    ("collapses", "collapses"),
    ("train_time_s", "RL train time (s)"),
)


def rl_records(records: Sequence[Mapping]) -> list[Mapping]:
    """The RL lines of a run (warm-start lines have their own phase and step count)."""
    return [r for r in records if is_rl_phase(r.get("phase"))]


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """{"mean", "std", "min", "max", "n", "per_seed"} over the finite values (None/nan skipped)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    stats: dict[str, Any] = {
        "n": int(finite.size),
        "per_seed": [None if v is None else float(v) for v in values],
    }
    if finite.size == 0:
        return stats | {"mean": None, "std": None, "min": None, "max": None}
    return stats | {
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """out[i] = mean(values[max(0, i - window + 1) : i + 1])."""
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def without_compilation(step_time: np.ndarray) -> np.ndarray:
    """Step times with the first step's (which includes compiling every phase) replaced by the median
    of the others, so train time compares arms on compute, not on compilation."""
    if step_time.size < 2:
        return step_time
    return np.concatenate([[np.median(step_time[1:])], step_time[1:]])


def collapse_starts(values: Sequence[float], drop: float = COLLAPSE_DROP) -> list[int]:
    """Indices where a collapse episode starts: values[i] < running best of values[:i+1] - drop,
    having been within `drop` of the running best at i - 1 (or i == 0 being impossible)."""
    starts, best, inside = [], -math.inf, False
    for i, value in enumerate(values):
        best = max(best, value)
        below = value < best - drop
        if below and not inside:
            starts.append(i)
        inside = below
    return starts


def _mean_of(records: Sequence[Mapping], key: str) -> float | None:
    _, values = series(records, key)
    return float(values.mean()) if values.size else None


def run_summary(records: Sequence[Mapping], wall_s: float | None = None, stopped: str | None = None) -> dict:
    """One run's numbers: accuracy (start / final / best), reward, clip fractions, routing volatility,
    collapse events (with their steps), skipped updates and time."""
    rl = rl_records(records)
    eval_steps, accuracy = series(rl, ACCURACY_KEY)
    reward_steps, reward = series(rl, REWARD_KEY)
    during_rl = accuracy[eval_steps >= 1]
    tail = max(1, reward.size // 10)
    _, step_time = series(rl, "step_time_s")
    nonfinite_steps = sorted(
        {int(s) for s, v in zip(*series(rl, "update_skipped")) if v > 0}
        | {int(r["step"]) for r in rl if is_number(r.get("loss")) and not math.isfinite(r["loss"])}
    )
    accuracy_collapses = [int(eval_steps[i]) for i in collapse_starts(accuracy)]
    reward_collapses = [int(reward_steps[i]) for i in collapse_starts(trailing_mean(reward, REWARD_WINDOW))]
    layers = sorted(
        (int(m[1]), key)
        for key in dict.fromkeys(k for r in rl for k in r)
        if (m := _VOLATILITY_LAYER.match(key))
    )
    return {
        "eval_start": float(accuracy[eval_steps == 0][-1]) if (eval_steps == 0).any() else None,
        "eval_final": float(accuracy[-1]) if accuracy.size else None,
        "eval_best": float(during_rl.max()) if during_rl.size else None,
        "reward_final": float(reward[-tail:].mean()) if reward.size else None,
        "reward_mean": float(reward.mean()) if reward.size else None,
        "clip_frac_token": _mean_of(rl, CLIP_KEYS[0]),
        "clip_frac_seq": _mean_of(rl, CLIP_KEYS[1]),
        "routing_volatility": _mean_of(rl, VOLATILITY_KEY),
        "routing_replay_volatility": _mean_of(rl, REPLAY_VOLATILITY_KEY),
        "routing_volatility_per_layer": [_mean_of(rl, key) for _, key in layers],
        "collapse_steps": {
            "eval_accuracy": accuracy_collapses,
            "reward": reward_collapses,
            "nonfinite_updates": nonfinite_steps,
            "stopped": stopped,
        },
        "collapses": len(accuracy_collapses)
        + len(reward_collapses)
        + len(nonfinite_steps)
        + int(bool(stopped)),
        "steps": int(reward_steps.max()) if reward_steps.size else 0,
        "train_time_s": float(without_compilation(step_time).sum()) if step_time.size else None,
        "step_time_s": float(np.median(without_compilation(step_time))) if step_time.size else None,
        "wall_s": wall_s,
    }


def ratio_by_length(records: Sequence[Mapping]) -> list[dict]:
    """Per completion-length bin, over the RL steps where the bin held completions: the mean variance
    of the token-level log-ratio sum and of the length-normalised sequence log-ratio, the completions
    counted, and the bin's longest completion."""
    rl = rl_records(records)
    bins: dict[int, dict[str, str]] = {}
    for key in dict.fromkeys(k for r in rl for k in r):
        if m := _RATIO_BIN.match(key):
            bins.setdefault(int(m[1]), {})[m[2]] = key
    rows = []
    for j, keys in sorted(bins.items()):
        used = [
            r
            for r in rl
            if is_number(r.get(keys.get("count", ""), 1)) and r.get(keys.get("count", ""), 1) > 0
        ]
        _, max_len = series(used, keys.get("max_len", ""))
        _, count = series(used, keys.get("count", ""))
        rows.append(
            {
                "bin": j,
                "max_len": float(max_len.max()) if max_len.size else None,
                "count": float(count.sum()) if count.size else None,
                "var_token_logratio_sum": _mean_of(used, keys.get("var_token_logratio_sum", "")),
                "var_seq_logratio": _mean_of(used, keys.get("var_seq_logratio", "")),
            }
        )
    return rows


def curve(runs: Sequence[Sequence[Mapping]], key: str) -> dict[str, list] | None:
    """Mean, min and max over seeds of `key` at the RL steps every seed logged it, and the mean train
    time (cumulative step_time_s) at those steps; None when no seed logged it everywhere."""
    per_seed = []
    for records in runs:
        rl = rl_records(records)
        steps, values = series(rl, key)
        time_steps, step_time = series(rl, "step_time_s")
        elapsed = dict(zip(time_steps.tolist(), np.cumsum(without_compilation(step_time)).tolist()))
        per_seed.append({int(s): (v, elapsed.get(int(s), 0.0)) for s, v in zip(steps, values)})
    common = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    if not common:
        return None
    values = np.asarray([[p[s][0] for s in common] for p in per_seed])
    elapsed = np.asarray([[p[s][1] for s in common] for p in per_seed])
    return {
        "step": common,
        "train_time_s": elapsed.mean(axis=0).tolist(),
        "mean": values.mean(axis=0).tolist(),
        "min": values.min(axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
    }


def build_report(arms: Mapping[str, Mapping], setup: Mapping[str, Any]) -> dict:
    """The report as a JSON-able dict.

    arms: {arm: {"settings": {key: value}, "note": str (optional),
                 "runs": [{"seed": int, "records": [...], "wall_s": float | None, "stopped": str | None}]}}.
    """
    report: dict[str, Any] = {
        "setup": dict(setup),
        "definitions": {
            "spread": "over seeds: mean, std (numpy, ddof=0), min and max of one number per seed",
            "train_time": (
                "cumulative step_time_s of the RL steps (evaluation, warm start, checkpoints excluded; "
                "the first step, which compiles, counted at the median step time)"
            ),
            "collapse": (
                f"an episode in which eval accuracy falls more than {COLLAPSE_DROP} below its running best, or "
                f"the trailing {REWARD_WINDOW}-step mean reward more than {COLLAPSE_DROP} below its running best "
                "(ends when back within it); plus one per step with skipped non-finite updates and one per "
                "run stopped early"
            ),
            "final_reward": "mean reward/mean over the last 10% of RL steps",
        },
        "arms": {},
        "curves": {},
        "ratio_by_length": {},
    }
    for arm, spec in arms.items():
        runs = spec["runs"]
        summaries = [run_summary(r["records"], r.get("wall_s"), r.get("stopped")) for r in runs]
        numeric = (
            [k for k in summaries[0] if all(s[k] is None or is_number(s[k]) for s in summaries)]
            if summaries
            else []
        )
        report["arms"][arm] = {
            "settings": dict(spec.get("settings", {})),
            "note": spec.get("note", ""),
            "seeds": [r["seed"] for r in runs],
            "runs": summaries,
            "summary": {k: spread([s[k] for s in summaries]) for k in numeric},
        }
        records = [r["records"] for r in runs]
        report["curves"][arm] = {
            key: c
            for key in (ACCURACY_KEY, REWARD_KEY, *CLIP_KEYS, VOLATILITY_KEY, REPLAY_VOLATILITY_KEY)
            if (c := curve(records, key)) is not None
        }
        bins = [ratio_by_length(r) for r in records]
        report["ratio_by_length"][arm] = (
            [
                {
                    "bin": rows[0]["bin"],
                    "max_len": spread([row["max_len"] for row in rows])["max"],
                    "count": spread([row["count"] for row in rows])["mean"],
                    "var_token_logratio_sum": spread([row["var_token_logratio_sum"] for row in rows]),
                    "var_seq_logratio": spread([row["var_seq_logratio"] for row in rows]),
                }
                for rows in zip(*bins)
            ]
            if bins and all(bins)
            else []
        )
    return report


# ----- report.md -----------------------------------------------------------------------------------


def _cell(stats: Mapping[str, Any], digits: int = 3) -> str:
    if stats.get("mean") is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _statement(report: Mapping) -> list[str]:
    """Plain sentences: which arm ends highest and whether the seed ranges overlap."""
    finals = {
        arm: a["summary"]["eval_final"]
        for arm, a in report["arms"].items()
        if a["summary"].get("eval_final", {}).get("mean") is not None
    }
    if not finals:
        return ["No arm logged eval accuracy, so no arm can be ranked."]
    ranked = sorted(finals, key=lambda arm: finals[arm]["mean"], reverse=True)
    text = ", ".join(
        f"{arm} {finals[arm]['mean']:.3f} (seeds {finals[arm]['min']:.3f}-{finals[arm]['max']:.3f})"
        for arm in ranked
    )
    lines = [f"Final held-out accuracy, highest mean first: {text}."]
    if len(ranked) > 1:
        top, rest = finals[ranked[0]], [finals[a] for a in ranked[1:]]
        if top["n"] < 2:
            lines.append("One seed per arm: there is no spread over seeds to judge these differences by.")
        elif all(top["min"] > other["max"] for other in rest):
            lines.append(f"{ranked[0]}'s worst seed beats every other arm's best seed.")
        else:
            lines.append(
                f"The seed ranges of {ranked[0]} and at least one other arm overlap: with these seeds the "
                "comparison does not separate the arms on final accuracy."
            )
    eval_size = report["setup"].get("eval problems")
    if eval_size:
        p = finals[ranked[0]]["mean"]
        lines.append(
            f"One accuracy on {eval_size} held-out problems has a sampling standard error of about "
            f"{math.sqrt(max(p * (1 - p), 0.0) / eval_size):.3f} (binomial, at {p:.2f})."
        )
    return lines


def format_markdown(report: Mapping, plots: Sequence[str]) -> str:
    """report.md from `build_report`'s dict; `plots` are file names under plots/."""
    setup = report["setup"]
    lines = ["# GSPO vs GRPO vs GRPO + routing replay", ""]
    lines += ["## Setup", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in setup.items()]
    lines += ["", "Arms (only these keys differ between arms):", ""]
    for arm, a in report["arms"].items():
        settings = ", ".join(f"`{k}={v}`" for k, v in a["settings"].items())
        lines.append(f"- **{arm}**: {settings}" + (f" — {a['note']}" if a["note"] else ""))
    lines += [
        "",
        "## Results",
        "",
        "Mean ± std over seeds (one number per seed; per-seed values in report.json).",
        "",
    ]
    lines.append("| arm | " + " | ".join(h for _, h in TABLE_COLUMNS) + " |")
    lines.append("|---" * (len(TABLE_COLUMNS) + 1) + "|")
    for arm, a in report["arms"].items():
        cells = [
            _cell(a["summary"].get(k, {}), 1 if k in ("train_time_s", "collapses") else 3)
            for k, _ in TABLE_COLUMNS
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", *_statement(report), ""]
    for name in plots:
        lines += [f"![{name}](plots/{name})", ""]

    lines += ["## Collapse events", "", f"Definition: {report['definitions']['collapse']}.", ""]
    for arm, a in report["arms"].items():
        for seed, run in zip(a["seeds"], a["runs"]):
            events = run["collapse_steps"]
            parts = [f"{k.replace('_', ' ')} at steps {v}" for k, v in events.items() if v and k != "stopped"]
            if events["stopped"]:
                parts.append(f"stopped: {events['stopped']}")
            lines.append(f"- {arm} seed {seed}: " + ("; ".join(parts) if parts else "none"))
    lines.append("")

    lines += ["## Routing volatility", ""]
    layered = {
        arm: a["runs"][0]["routing_volatility_per_layer"] for arm, a in report["arms"].items() if a["runs"]
    }
    if not any(
        a["summary"].get("routing_volatility", {}).get("mean") is not None for a in report["arms"].values()
    ):
        lines += [
            "No run logged `routing/volatility` (`log.routing_volatility` off, or a build without it).",
            "",
        ]
    else:
        lines += [
            (
                "Fraction of (token, MoE layer) top-k expert sets that change between the policy before and "
                "after a minibatch update, mean over steps; replay: the same for the replayed forward."
            ),
            "",
            "| arm | volatility | replay volatility | per layer (seed 0) |",
            "|---|---|---|---|",
        ]
        for arm, a in report["arms"].items():
            per_layer = ", ".join("-" if v is None else f"{v:.3f}" for v in layered.get(arm, []))
            lines.append(
                f"| {arm} | {_cell(a['summary'].get('routing_volatility', {}))} | "
                f"{_cell(a['summary'].get('routing_replay_volatility', {}))} | {per_layer or '-'} |"
            )
        lines.append("")

    lines += ["## Ratio variance vs completion length", ""]
    if not any(report["ratio_by_length"].values()):
        lines += [
            "No run logged `ratio_len/bin*` metrics (`log.ratio_by_length` off, or a build without it).",
            "",
        ]
    else:
        lines += [
            (
                "Per completion-length bin (up to its longest completion): variance of the token-level "
                "log-ratio sum vs of the length-normalised sequence log-ratio, mean over steps and seeds; "
                "completions counted over all steps."
            ),
            "",
            "| arm | bin | longest | completions | var token log-ratio sum | var seq log-ratio |",
            "|---|---|---|---|---|---|",
        ]
        for arm, rows in report["ratio_by_length"].items():
            for row in rows:
                longest = "-" if row["max_len"] is None else f"{row['max_len']:.0f}"
                count = "-" if row["count"] is None else f"{row['count']:.0f}"
                lines.append(
                    f"| {arm} | {row['bin']} | {longest} | {count} | "
                    f"{_cell(row['var_token_logratio_sum'], 4)} | {_cell(row['var_seq_logratio'], 6)} |"
                )
        lines.append("")
    lines += ["## Definitions", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in report["definitions"].items()]
    return "\n".join(lines) + "\n"


# ----- plots -----------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * cols, 3.6 * rows), dpi=80)
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    return figure, figure.subplots(rows, cols, squeeze=False)


def _band(axes, c: Mapping, x_key: str, label: str, color: str, linestyle: str = "-") -> None:
    x = np.asarray(c[x_key])
    axes.plot(x, c["mean"], color=color, linestyle=linestyle, label=label)
    axes.fill_between(x, c["min"], c["max"], color=color, alpha=0.2, linewidth=0)


def _finish(figure, path: Path) -> None:
    for axes in figure.axes:
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def write_plots(report: Mapping, out: Path) -> list[str]:
    """plots/*.png of the curves (mean line, min-max band over seeds); returns the file names written.
    A plot none of whose keys any arm logged is not drawn."""
    out.mkdir(parents=True, exist_ok=True)
    colors = dict(zip(report["curves"], ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")))
    written = []

    def draw(name: str, title: str, panels: Sequence[tuple[str, str, str]]) -> None:
        """panels: (metric key, x key, y label) per subplot."""
        if not any(key in curves for curves in report["curves"].values() for key, _, _ in panels):
            return
        figure, axes = _figure(1 if len(panels) < 3 else 2, min(len(panels), 2), title)
        for ax, (key, x_key, ylabel) in zip(axes.flat, panels):
            for arm, curves in report["curves"].items():
                if key in curves:
                    _band(ax, curves[key], x_key, arm, colors[arm])
            ax.set_xlabel("RL step" if x_key == "step" else "train time (s)")
            ax.set_ylabel(ylabel)
        _finish(figure, out / name)
        written.append(name)

    draw(
        "accuracy_reward.png",
        "Held-out accuracy and reward (mean, min-max over seeds)",
        [
            (ACCURACY_KEY, "step", "eval accuracy"),
            (ACCURACY_KEY, "train_time_s", "eval accuracy"),
            (REWARD_KEY, "step", "reward"),
            (REWARD_KEY, "train_time_s", "reward"),
        ],
    )
    draw("clip_fraction.png", "Clipped fraction", [(k, "step", k) for k in CLIP_KEYS])
    draw(
        "routing_volatility.png",
        "Routing volatility per update",
        [(VOLATILITY_KEY, "step", "volatility"), (REPLAY_VOLATILITY_KEY, "step", "replay volatility")],
    )
    if any(report["ratio_by_length"].values()):
        figure, axes = _figure(1, 1, "Log-ratio variance vs completion length")
        ax = axes[0, 0]
        for arm, rows in report["ratio_by_length"].items():
            for stat, style, label in (
                ("var_token_logratio_sum", "-", "token log-ratio sum"),
                ("var_seq_logratio", "--", "seq log-ratio (length-normalised)"),
            ):
                points = [
                    (r["max_len"], r[stat]["mean"])
                    for r in rows
                    if r["max_len"] is not None and r[stat]["mean"]
                ]
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=colors[arm], label=f"{arm}: {label}")
        ax.set_xlabel("completion length (bin's longest)")
        ax.set_ylabel("variance over completions")
        ax.set_yscale("log")
        _finish(figure, out / "ratio_variance_length.png")
        written.append("ratio_variance_length.png")
    return written


def write_report(arms: Mapping[str, Mapping], setup: Mapping[str, Any], out_dir: str | Path) -> dict:
    """Writes out_dir/report.json, report.md and plots/*.png; returns the report dict."""
    out_dir = Path(out_dir)
    report = build_report(arms, setup)
    plots = write_plots(report, out_dir / "plots")
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(format_markdown(report, plots))
    return report
