"""Prompt records from JSONL / Parquet files or a built-in task, validated one by one.

A prompt is a non-empty string, or a chat: a list of {"role": ..., "content": ...} messages (system
prompt included) that the data pipeline renders with the tokenizer's chat template, as TRL does.

Each record keeps its origin ("file:line N", "file:row N", "task ... record N"), so every error
about a record, here or later in tokenizing, names where the user can fix it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

import pyarrow.parquet as pq

from gspo_jax import tasks

# A text prompt, or a chat: [{"role": "system", "content": ...}, {"role": "user", "content": ...}].
Prompt = str | list[dict[str, str]]

_JSONL_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)


@dataclasses.dataclass
class Records:
    """Parallel lists, one entry per record: prompt, other columns, origin "file:line N"."""

    prompts: list[Prompt]
    rows: list[dict[str, Any]]
    origins: list[str]

    def columns(self) -> list[str]:
        return sorted({k for row in self.rows for k in row})


def _expand_paths(path: str | Sequence[str]) -> list[str]:
    patterns = [p.strip() for p in path.split(",")] if isinstance(path, str) else list(path)
    files: list[str] = []
    for pattern in filter(None, patterns):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise ValueError(f"data file {pattern!r} not found: check data.path / data.eval_path.")
        files.extend(matches)
    return files


def _read_file(path: str) -> list[tuple[str, Any]]:
    """(origin, raw record) pairs of one JSONL or Parquet file."""
    if path.endswith(_PARQUET_SUFFIXES):
        rows = pq.read_table(path).to_pylist()
        return [(f"{path}:row {i}", row) for i, row in enumerate(rows, start=1)]
    if not path.endswith(_JSONL_SUFFIXES):
        raise ValueError(
            f"data file {path!r} must end in one of {_JSONL_SUFFIXES + _PARQUET_SUFFIXES} "
            "(JSON lines or Parquet)."
        )
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:line {number}: not valid JSON ({e}).") from None
    return out


def _checked_prompt(prompt: Any, origin: str) -> Prompt:
    """The record's prompt if it is a non-empty string or a well-formed chat; else a ValueError."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{origin}: the prompt must be a non-empty string, got {prompt!r}.")
        return prompt
    if not isinstance(prompt, list):
        raise ValueError(
            f"{origin}: the prompt must be a non-empty string or a list of "
            f'{{"role", "content"}} messages, got {type(prompt).__name__} {prompt!r}.'
        )
    if not prompt:
        raise ValueError(f"{origin}: the prompt is an empty list of messages: give at least a user message.")
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(
                f'{origin}: message {i} of the prompt must be an object with "role" and "content", '
                f"got {message!r}."
            )
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role.strip():
            raise ValueError(f"{origin}: message {i} has role {role!r}; use e.g. 'system' or 'user'.")
        if not isinstance(content, str):
            raise ValueError(
                f"{origin}: message {i} ({role}) has content of type {type(content).__name__}; "
                "content must be a string."
            )
    if prompt[-1]["role"] == "assistant":
        raise ValueError(
            f"{origin}: the prompt's last message is from the assistant; the completion is generated "
            "after the prompt, so end the prompt with a user message."
        )
    if not any(m["content"].strip() for m in prompt):
        raise ValueError(f"{origin}: every message of the prompt is empty.")
    return [dict(m) for m in prompt]


def _validated(raw: Sequence[tuple[str, Any]], prompt_field: str) -> Records:
    records = Records([], [], [])
    for origin, record in raw:
        if not isinstance(record, dict):
            raise ValueError(f"{origin}: a record must be a JSON object, got {type(record).__name__}.")
        if prompt_field not in record:
            raise ValueError(
                f"{origin}: record has no {prompt_field!r} field (it has {sorted(record)}); add "
                "one, or set data.prompt_field to the column holding the prompt."
            )
        records.prompts.append(_checked_prompt(record[prompt_field], origin))
        records.rows.append({k: v for k, v in record.items() if k != prompt_field})
        records.origins.append(origin)
    return records


def file_records(path: str | Sequence[str], prompt_field: str) -> Records:
    """All records of the files `path` names (a path, a glob, comma-separated, or a list), in order."""
    raw = [item for file in _expand_paths(path) for item in _read_file(file)]
    if not raw:
        raise ValueError(f"data files {path!r} hold no records.")
    return _validated(raw, prompt_field)


def task_records(task: tasks.Task, split: str, seed: int, n: int) -> Records:
    """`n` records of a built-in task's `split`, generated from `seed`."""
    raw = [
        (f"task {task.name} ({split}) record {i}", r)
        for i, r in enumerate(task.records(split, seed, n), start=1)
    ]
    return _validated(raw, "prompt")
