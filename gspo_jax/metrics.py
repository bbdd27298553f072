"""Run metrics: metrics.jsonl, samples.jsonl, TensorBoard and a console progress bar.

Only process 0 writes files and prints. Files under `workdir`:

  metrics.jsonl  one JSON object per `write()` call: {"step": int, "phase": str (only when given),
                 <metric>: value, ...}. Array scalars become Python ints/floats, 1-D arrays lists.
                 JSON has no NaN, so non-finite floats are written as the strings "nan", "inf",
                 "-inf"; `read_metrics()` turns them back into floats. Each line is flushed to the
                 OS as it is written, so a killed process (SIGKILL) loses no written line.
  samples.jsonl  one JSON object per sample: {"step": int, <sample fields>}.
  tb/<phase>/    TensorBoard event files, one run per phase ("rl" for lines without a phase),
                 so that rewinding the RL run after a resume does not purge other phases.
  plots/*.png    written by `gspo_jax.plots.plot_metrics()` at the end of a run.

Lines without a phase (or with phase "rl") are RL lines: they move the progress bar and feed the
RL plots. Other phases (e.g. "warmstart") are logged and plotted, but never move the RL bar.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
RL_PHASE = "rl"

# (label, metric keys tried in order): what the progress bar / CI summary line shows.
DEFAULT_POSTFIX: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward/mean",)),
    ("acc", ("eval/accuracy",)),
    ("loss", ("loss", "loss/policy")),
    ("clip/seq", ("clip_frac/seq",)),
    ("tok/s", ("tokens_per_s",)),
)

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# Metrics a run logs that can rank checkpoints (checkpoint.keep_best_by), with the better direction.
RANKABLE = {
    "eval/accuracy": "max",
    "eval/reward/mean": "max",
    "reward/mean": "max",
    "loss": "min",
    "kl": "min",
    "kl_ref": "min",
    "entropy": "max",
    "frac_reward_zero_std": "min",
}


def rankable_metrics(reward_names: Sequence[str], with_eval: bool) -> dict[str, str]:
    """{metric: "max" | "min"} of the rankable metrics this run logs: RANKABLE, the per-function
    reward means, and the eval metrics only when evaluation runs."""
    names = {k: v for k, v in RANKABLE.items() if with_eval or not k.startswith("eval/")}
    names.update({f"reward/{name}/mean": "max" for name in reward_names})
    return names


def is_rl_phase(phase: str | None) -> bool:
    """Whether a line with this phase belongs to the RL run (no phase counts as RL)."""
    return phase is None or phase == RL_PHASE


def is_number(value: Any) -> bool:
    """Whether a metric value is a plain int or float (a bool is not): a scalar to log or plot."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def to_json_value(value: Any, name: str = "value") -> Any:
    """Converts a metric value (Python, numpy or fetched jax value) to a JSON-safe value.

    Scalars become int/float/bool, arrays nested lists, non-finite floats "nan"/"inf"/"-inf".
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (np.ndarray, jax.Array)):
        array = np.asarray(value)
        if array.ndim == 0:
            return to_json_value(array.item(), name)
        return [to_json_value(v, name) for v in array]
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v, f"{name}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, name) for v in value]
    raise TypeError(
        f"metric {name!r} has type {type(value).__name__}; pass numbers, arrays, strings, lists or dicts"
    )


def _from_json_value(value: Any) -> Any:
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, list):
        return [_from_json_value(v) for v in value]
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSON-lines file; a torn last line (process killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Reads `workdir/metrics.jsonl`, turning "nan"/"inf"/"-inf" strings back into floats."""
    return [
        {k: _from_json_value(v) for k, v in record.items()}
        for record in read_jsonl(Path(workdir) / METRICS_FILE)
    ]


def expert_load_metrics(load_le: np.ndarray) -> dict[str, Any]:
    """Summarises MoE routing balance from per-layer expert loads.

    Args:
      load_le: [layers, experts] tokens (or fractions) routed to each expert in each layer.

    Returns:
      "moe/load_max_over_mean": max over layers of (max_e load / mean_e load); the worst layer
        is what limits capacity-based dispatch (1.0 = perfectly balanced).
      "moe/load_cv": mean over layers of the coefficient of variation std_e / mean_e.
      "moe/expert_load": list [experts] of each expert's share of its layer's tokens, averaged
        over layers (sums to 1). A list goes to metrics.jsonl only, not to TensorBoard.
      Layers that routed no tokens count as balanced.
    """
    load_le = np.asarray(load_le, dtype=np.float64)
    if load_le.ndim != 2 or load_le.shape[1] == 0:
        raise ValueError(
            f"expert_load_metrics needs a [layers, experts] array, got shape {load_le.shape}; "
            "stack the per-layer load vectors along axis 0"
        )
    mean_l = load_le.mean(axis=1)
    safe_mean_l = np.where(mean_l > 0, mean_l, 1.0)
    max_over_mean_l = np.where(mean_l > 0, load_le.max(axis=1) / safe_mean_l, 1.0)
    cv_l = np.where(mean_l > 0, load_le.std(axis=1) / safe_mean_l, 0.0)
    total_l = load_le.sum(axis=1, keepdims=True)
    uniform = 1.0 / load_le.shape[1]
    share_le = np.where(total_l > 0, load_le / np.where(total_l > 0, total_l, 1.0), uniform)
    return {
        "moe/load_max_over_mean": float(max_over_mean_l.max()),
        "moe/load_cv": float(cv_l.mean()),
        "moe/expert_load": [float(v) for v in share_le.mean(axis=0)],
    }


def _format_number(value: Any) -> str:
    if not is_number(value):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """Writes metrics and samples to JSON lines and TensorBoard; shows RL progress on the console.

    Console: on a TTY, one tqdm bar over RL steps with ETA and the main metrics as postfix.
    Otherwise (CI logs) no bar: one compact summary line for the first RL step as soon as it ends,
    then every `summary_every` RL steps and at the last step. ETAs use the pace of the steps after
    the first, which includes compilation. `log(msg)` prints a line above the bar.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        enable_tensorboard: bool = True,
        console: bool = True,
        process_index: int = 0,
        summary_every: int = 10,
        postfix: Sequence[tuple[str, Sequence[str]]] = DEFAULT_POSTFIX,
        stream: TextIO | None = None,
    ):
        if total_steps < 0 or summary_every < 1:
            raise ValueError(
                f"MetricsWriter needs total_steps >= 0 and summary_every >= 1, got "
                f"{total_steps} and {summary_every}"
            )
        self.workdir = Path(workdir)
        self.total_steps = total_steps
        self.is_writer = process_index == 0
        self._enable_tensorboard = enable_tensorboard and self.is_writer
        self._console = console and self.is_writer
        self._summary_every = summary_every
        self._postfix = tuple((label, tuple(keys)) for label, keys in postfix)
        self._stream = stream if stream is not None else sys.stdout
        self._latest: dict[str, Any] = {}
        self._tb_writers: dict[str, Any] = {}
        self._tb_purge_step: dict[str, int] = {}
        self._tb_opened = 0
        self._metrics_file = self._samples_file = None
        if self.is_writer:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._metrics_file = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")
            self._samples_file = open(self.workdir / SAMPLES_FILE, "a", encoding="utf-8")
        self._bar = None
        self._start_progress(0)

    # ----- console -------------------------------------------------------------------------
    def _start_progress(self, step: int) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._progress_start = (step, time.monotonic())
        self._rate_start: tuple[int, float] | None = None  # (step, time) the first step ended: ETA base
        self._step = step
        self._last_summary_step = step
        if self._console and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=step,
                file=self._stream,
                unit="step",
                dynamic_ncols=True,
                desc="RL",
            )

    def _postfix_text(self, sep: str) -> str:
        parts = []
        for label, keys in self._postfix:
            value = next((self._latest[k] for k in keys if k in self._latest), None)
            if value is not None:
                parts.append(f"{label} {_format_number(value)}")
        return sep.join(parts)

    def _eta_seconds(self) -> float | None:
        """Remaining time at the pace of the steps after the first (which includes compilation)."""
        if self._rate_start is None or self._step <= self._rate_start[0] or self._step >= self.total_steps:
            return None
        rate_step, rate_time = self._rate_start
        return (time.monotonic() - rate_time) / (self._step - rate_step) * (self.total_steps - self._step)

    def _summary_line(self) -> str:
        elapsed = time.monotonic() - self._progress_start[1]
        line = f"step {self._step}/{self.total_steps}"
        postfix = self._postfix_text(" | ")
        if postfix:
            line += " | " + postfix
        line += f" | elapsed {_format_seconds(elapsed)}"
        eta = self._eta_seconds()
        if eta is not None:
            line += f" | eta {_format_seconds(eta)}"
        elif self._rate_start is not None and self._step == self._rate_start[0] and self._step < self.total_steps:
            line += " | first step (includes compilation)"
        return line

    def _update_console(self, step: int, values: Mapping[str, Any]) -> None:
        self._latest.update(values)
        first = self._rate_start is None and step > self._progress_start[0]
        self._step = max(self._step, step)
        if first:
            self._rate_start = (self._step, time.monotonic())
        if self._bar is not None:
            if first:  # tqdm's rate and ETA then count from the end of the first (compiling) step
                self._bar.update(self._step - self._bar.n)
                self._bar.initial, self._bar.start_t = self._bar.n, self._bar._time()
            if self._step > self._bar.n:
                self._bar.update(self._step - self._bar.n)
            self._bar.set_postfix_str(self._postfix_text(", "), refresh=True)
            return
        due = first or self._step // self._summary_every > self._last_summary_step // self._summary_every
        if due or (self._step == self.total_steps and self._last_summary_step != self._step):
            self._last_summary_step = self._step
            print(self._summary_line(), file=self._stream, flush=True)

    def log(self, message: str) -> None:
        """Prints one line above the progress bar (process 0 only)."""
        if not self._console:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    # ----- files ---------------------------------------------------------------------------
    def _tb_writer(self, phase: str):
        if phase not in self._tb_writers:
            from tensorboardX import SummaryWriter

            # Event file names hold the time in seconds: a writer reopened within the same
            # second (after truncate_after) would overwrite its predecessor without a suffix.
            self._tb_opened += 1
            self._tb_writers[phase] = SummaryWriter(
                str(self.workdir / "tb" / phase),
                purge_step=self._tb_purge_step.pop(phase, None),
                filename_suffix=f".{os.getpid()}.{self._tb_opened}",
            )
        return self._tb_writers[phase]

    def write(self, step: int, metrics: Mapping[str, Any], phase: str | None = None) -> None:
        """Appends one line {"step", "phase"?, **metrics} to metrics.jsonl and logs scalars.

        Eval results use the same call with keys such as "eval/accuracy".
        """
        reserved = {"step", "phase"} & set(metrics)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved for the line header; rename them")
        if not self.is_writer:
            return
        # One device_get for all values; over a list, so the caller's key order is kept.
        fetched = jax.device_get(list(metrics.values()))
        values = {str(k): to_json_value(v, str(k)) for k, v in zip(metrics, fetched)}
        record: dict[str, Any] = {"step": int(step)}
        if phase is not None:
            record["phase"] = phase
        record.update(values)
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()
        if self._enable_tensorboard:
            self._write_tensorboard(int(step), values, phase)
        if self._console and is_rl_phase(phase):
            self._update_console(int(step), values)

    def _write_tensorboard(self, step: int, values: Mapping[str, Any], phase: str | None) -> None:
        writer = self._tb_writer(RL_PHASE if phase is None else phase)
        for key, value in values.items():
            value = _from_json_value(value)
            if is_number(value):
                writer.add_scalar(key, float(value), step)
        writer.flush()

    def write_samples(self, step: int, samples: Iterable[Mapping[str, Any]]) -> None:
        """Appends one line {"step", **sample} per sample to samples.jsonl."""
        if not self.is_writer:
            return
        for sample in samples:
            if "step" in sample:
                raise ValueError("sample field 'step' is reserved for the line header; rename it")
            record = {"step": int(step), **to_json_value(dict(sample), "sample")}
            self._samples_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._samples_file.flush()

    def truncate_after(self, step: int, keep_phases: Iterable[str] = ()) -> None:
        """Forgets what was logged after `step`, so steps redone after a resume are not doubled.

        A line of metrics.jsonl / samples.jsonl is kept iff its step <= `step` or its phase is
        in `keep_phases` (e.g. {"warmstart"} for a finished phase with its own step count).
        Files are rewritten atomically (temp file, then os.replace). TensorBoard runs of the
        phases not kept get a purge step, so TensorBoard hides their old events after `step`.
        The progress bar restarts at `step`.
        """
        keep_phases = set(keep_phases)
        if self.is_writer:
            self._metrics_file = self._rewrite_kept(self._metrics_file, METRICS_FILE, step, keep_phases)
            self._samples_file = self._rewrite_kept(self._samples_file, SAMPLES_FILE, step, keep_phases)
            tb_root = self.workdir / "tb"
            phases = {p.name for p in tb_root.iterdir() if p.is_dir()} if tb_root.exists() else set()
            for phase in (phases | set(self._tb_writers)) - keep_phases:
                if phase in self._tb_writers:
                    self._tb_writers.pop(phase).close()
                self._tb_purge_step[phase] = step + 1
        self._latest.clear()
        self._start_progress(max(step, 0))

    def _rewrite_kept(self, handle: TextIO, name: str, step: int, keep_phases: set[str]) -> TextIO:
        handle.close()
        path = self.workdir / name
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step or r.get("phase") in keep_phases]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return open(path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for writer in self._tb_writers.values():
            writer.close()
        self._tb_writers.clear()
        for handle in (self._metrics_file, self._samples_file):
            if handle is not None and not handle.closed:
                handle.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
