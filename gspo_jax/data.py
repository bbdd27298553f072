"""Prompt pipelines: JSONL / Parquet files or a built-in task -> tokenized, per-host prompt batches.

Records are read, validated and tokenized once, before training starts, so a bad record or an
over-long prompt fails the run at start-up (with its file and line) instead of hours in. A grain
`MapDataset` over this host's record indices then shuffles (reshuffled each epoch), repeats,
batches and pads; its iterator is checkpointable with grain's Orbax handlers:

    ocp.args.Composite(data=grain.checkpoint.CheckpointSave(dataset.iterator), ...)

Config keys read from `cfg_data` (see `default_data_config()` for the defaults):
  task             built-in task name (`gspo_jax.tasks.TASKS`), used when `path` is empty.
  task_kwargs      dict of options for the task, e.g. {"num_digits": 4}.
  train_size       number of train records generated from the task.
  eval_size        number of eval records generated from the task's (disjoint) eval split; with
                   file data and no eval_path, at most this many (and at most 10%) of the
                   training file's records are held out for evaluation when the run evaluates.
  eval_seed        seed of the task's eval records (fixed, so every run evaluates the same set).
  path             JSONL / Parquet file(s): one path, a glob, a comma-separated string (or, in
                   a dict config, a list). Takes precedence over `task`. Every record needs a
                   prompt: a non-empty string, or a chat as a list of {"role", "content"} messages
                   (system prompt included), which always goes through the tokenizer's chat
                   template. Its other columns reach the reward functions as `fields`.
  eval_path        eval file(s), same forms; empty: the task's eval split if no `path`, else a
                   held-out split of `path` (see eval_size).
  prompt_field     name of the prompt column.
  max_prompt_len   prompts longer than this (in tokens, after the chat template and bos) are
  overlong         "drop"ped, "truncate"d to their last `max_prompt_len` tokens, or an "error".
  buckets          padded prompt widths. A batch is left-padded to the smallest bucket that fits
                   its longest prompt, so the sampler compiles once per bucket. Buckets above
                   `max_prompt_len` are dropped and `max_prompt_len` is always the last bucket.
  chat_template    wrap each text prompt as a user message in the tokenizer's chat template (with
                   the generation prompt); ignored, with a warning, if the tokenizer has none.
  add_bos          prepend the tokenizer's bos token (unless the prompt already starts with it).
  shuffle          shuffle the records (by the run's seed; a different order each epoch).
  num_epochs       passes over the records; None repeats forever.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from gspo_jax import tasks
from gspo_jax.records import Prompt, Records, file_records, task_records

_LOG = logging.getLogger(__name__)
OVERLONG_MODES = ("drop", "truncate", "error")


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with its defaults (the keys are documented in this module's docstring)."""
    return ml_collections.ConfigDict(
        {
            "task": "sort_digits",
            "task_kwargs": ml_collections.ConfigDict(),
            "train_size": 20_000,
            "eval_size": 200,
            "eval_seed": 0,
            "path": "",
            "eval_path": "",
            "prompt_field": "prompt",
            "max_prompt_len": 512,
            "overlong": "drop",
            "buckets": (16, 32, 64, 128, 256, 512, 1024),
            "chat_template": False,
            "add_bos": False,
            "shuffle": True,
            "num_epochs": ml_collections.config_dict.placeholder(int),
        }
    )


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """One step's prompts for this host.

    prompt_ids:  [N, P] int32, left-padded with the pad id; P is a bucket width.
    prompt_mask: [N, P] int32, 1 on real tokens, 0 on padding.
    prompts:     N prompts as the records hold them (text, or a list of chat messages; before the
                 chat template), for the reward functions.
    fields:      column -> N values: the records' other columns (e.g. "answer").
    valid:       [N] bool; False only on filler rows that pad the last eval batch.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    prompts: list[Prompt]
    fields: dict[str, list[Any]]
    valid: np.ndarray


# ---------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class _Settings:
    task: str
    task_kwargs: dict[str, Any]
    train_size: int
    eval_size: int
    eval_seed: int
    path: str | list[str]
    eval_path: str | list[str]
    prompt_field: str
    max_prompt_len: int
    overlong: str
    buckets: tuple[int, ...]  # effective buckets, ascending, last == max_prompt_len
    chat_template: bool
    add_bos: bool
    shuffle: bool
    num_epochs: int | None


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    raise ValueError(
        f"data config must be an ml_collections.ConfigDict, a dict or a dataclass, got {type(cfg).__name__}."
    )


def _read_settings(cfg_data: Any) -> _Settings:
    values = default_data_config().to_dict()
    given = _as_dict(cfg_data)
    unknown = sorted(set(given) - set(values))
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}: the known keys are {sorted(values)}.")
    values.update(given)
    overlong = values["overlong"]
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"data.overlong must be one of {OVERLONG_MODES}, got {overlong!r}.")
    max_len = int(values["max_prompt_len"])
    if max_len < 1:
        raise ValueError(f"data.max_prompt_len must be >= 1, got {max_len}.")
    buckets = values["buckets"]
    if isinstance(buckets, str):
        buckets = [b for b in buckets.replace("(", "").replace(")", "").split(",") if b.strip()]
    buckets = sorted({int(b) for b in buckets})
    if any(b < 1 for b in buckets):
        raise ValueError(f"data.buckets must be positive widths, got {values['buckets']}.")
    epochs = values["num_epochs"]
    if epochs is not None and int(epochs) < 1:
        raise ValueError(f"data.num_epochs must be >= 1, or None to repeat forever; got {epochs}.")
    for key in ("train_size", "eval_size"):
        if int(values[key]) < 1:
            raise ValueError(f"data.{key} must be >= 1, got {values[key]}.")
    return _Settings(
        task=values["task"],
        task_kwargs=dict(values["task_kwargs"] or {}),
        train_size=int(values["train_size"]),
        eval_size=int(values["eval_size"]),
        eval_seed=int(values["eval_seed"]),
        path=values["path"] or "",
        eval_path=values["eval_path"] or "",
        prompt_field=values["prompt_field"],
        max_prompt_len=max_len,
        overlong=overlong,
        buckets=tuple(b for b in buckets if b < max_len) + (max_len,),
        chat_template=bool(values["chat_template"]),
        add_bos=bool(values["add_bos"]),
        shuffle=bool(values["shuffle"]),
        num_epochs=None if epochs is None else int(epochs),
    )


def configured_task(cfg_data: Any) -> tasks.Task | None:
    """The built-in task the data config trains on, or None when it reads files (`path`)."""
    settings = _read_settings(cfg_data)
    return None if settings.path else tasks.get_task(settings.task, **settings.task_kwargs)


# ---------------------------------------------------------------------------------------------
# Tokenizing.


@dataclasses.dataclass
class _Tokenized:
    records: Records
    ids: list[np.ndarray]  # per record: [L] int32, L <= max_prompt_len
    dropped: int
    truncated: int


def encode_prompts(
    prompts: Sequence[Prompt], tokenizer: Any, *, chat_template: bool, add_bos: bool
) -> list[list[int]]:
    """Token ids of each prompt exactly as the sampler sees it (RL prompts and warm-start prompts alike).

    A prompt that is a list of {"role", "content"} messages always goes through the tokenizer's chat
    template with the generation prompt (as TRL does); a text prompt does when `chat_template` is set
    (as one user message). `add_bos` prepends the bos token unless the encoding already starts with it.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        _LOG.warning(
            "data.chat_template is set but the tokenizer has no chat template: "
            "text prompts are encoded as plain text."
        )
    bos = None
    if add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError(
                "data.add_bos is set but the tokenizer has no bos token: set "
                "data.add_bos=False (or give the tokenizer a bos_token)."
            )
    texts = []
    for prompt in prompts:
        messages = prompt if isinstance(prompt, list) else None
        if messages is None and chat_template and has_template:
            messages = [{"role": "user", "content": prompt}]
        if messages is not None and not has_template:
            raise ValueError(
                "chat-format prompts (lists of messages) need a tokenizer with a chat template: use "
                "the model's own tokenizer, or set tokenizer.chat_template."
            )
        texts.append(
            prompt
            if messages is None
            else tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(ids) if bos is None or list(ids[:1]) == [bos] else [bos, *ids] for ids in encoded]


def prompt_encoder(cfg_data: Any, tokenizer: Any) -> Callable[[Sequence[Prompt]], list[list[int]]]:
    """`encode_prompts` with the data config's chat_template / add_bos: one encoding for every phase."""
    settings = _read_settings(cfg_data)
    return functools.partial(
        encode_prompts, tokenizer=tokenizer, chat_template=settings.chat_template, add_bos=settings.add_bos
    )


def _tokenize(records: Records, tokenizer: Any, settings: _Settings) -> _Tokenized:
    bos = tokenizer.bos_token_id if settings.add_bos else None
    encoded = encode_prompts(
        records.prompts, tokenizer, chat_template=settings.chat_template, add_bos=settings.add_bos
    )
    kept = Records([], [], [])
    ids, dropped, truncated = [], 0, 0
    for i, tokens in enumerate(encoded):
        if not tokens:
            raise ValueError(f"{records.origins[i]}: the prompt encodes to no tokens.")
        if len(tokens) > settings.max_prompt_len:
            if settings.overlong == "error":
                raise ValueError(
                    f"{records.origins[i]}: the prompt has {len(tokens)} tokens, more than "
                    f"data.max_prompt_len={settings.max_prompt_len}: raise max_prompt_len, or set "
                    "data.overlong to 'drop' or 'truncate'."
                )
            if settings.overlong == "drop":
                dropped += 1
                continue
            truncated += 1
            keep = settings.max_prompt_len - (bos is not None)
            tokens = ([bos] if bos is not None else []) + tokens[len(tokens) - keep :]
        ids.append(np.asarray(tokens, np.int32))
        kept.prompts.append(records.prompts[i])
        kept.rows.append(records.rows[i])
        kept.origins.append(records.origins[i])
    if dropped or truncated:
        _LOG.warning(
            "%d of %d prompts are longer than data.max_prompt_len=%d tokens: %d dropped, %d truncated.",
            dropped + truncated,
            len(encoded),
            settings.max_prompt_len,
            dropped,
            truncated,
        )
    if not ids:
        raise ValueError(
            f"all {len(encoded)} prompts are longer than data.max_prompt_len="
            f"{settings.max_prompt_len} tokens: raise it or set data.overlong='truncate'."
        )
    return _Tokenized(kept, ids, dropped, truncated)


def bucket_width(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= `length` (buckets ascending)."""
    for width in buckets:
        if width >= length:
            return width
    raise ValueError(f"a prompt of {length} tokens fits no bucket in {tuple(buckets)}.")


def _collate(
    data: _Tokenized,
    columns: Sequence[str],
    indices: Sequence[int],
    buckets: Sequence[int],
    pad_id: int,
    valid: np.ndarray | None = None,
) -> PromptBatch:
    """Left-pads the records at `indices` to the smallest bucket that fits the longest."""
    rows = [data.ids[i] for i in indices]
    width = bucket_width(max(len(r) for r in rows), buckets)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    return PromptBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        prompts=[data.records.prompts[i] for i in indices],
        fields={c: [data.records.rows[i].get(c) for i in indices] for c in columns},
        valid=np.ones(len(rows), bool) if valid is None else valid,
    )


def widen(batch: PromptBatch, width: int, pad_id: int) -> PromptBatch:
    """`batch` left-padded to `width` columns (hosts bucket their own rows; the global batch takes the
    widest host's width)."""
    extra = width - batch.prompt_ids.shape[1]
    if extra < 0:
        raise ValueError(f"cannot narrow a batch of width {batch.prompt_ids.shape[1]} to {width}")
    return dataclasses.replace(
        batch,
        prompt_ids=np.pad(batch.prompt_ids, ((0, 0), (extra, 0)), constant_values=pad_id),
        prompt_mask=np.pad(batch.prompt_mask, ((0, 0), (extra, 0))),
    )


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token: load it with "
            "gspo_jax.tokenizer.load_tokenizer, which sets pad to eos."
        )
    return int(tokenizer.pad_token_id)


def _host_indices(n: int, process_index: int, process_count: int, what: str) -> np.ndarray:
    """Strided share of `n` records for this host; every host gets the same count.

    The last `n % process_count` records are left out so that all hosts run the same number of
    steps (hosts that ran out first would hang the others in a collective).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count}).")
    per_host = n // process_count
    if per_host == 0:
        raise ValueError(
            f"{n} {what} records cannot be shared by {process_count} hosts: "
            "give at least one record per host."
        )
    return np.arange(process_index, per_host * process_count, process_count)


def _subset(data: _Tokenized, indices: np.ndarray) -> _Tokenized:
    pick = [int(i) for i in indices]
    records = Records(
        [data.records.prompts[i] for i in pick],
        [data.records.rows[i] for i in pick],
        [data.records.origins[i] for i in pick],
    )
    return _Tokenized(records, [data.ids[i] for i in pick], data.dropped, data.truncated)


def _held_out(n: int, settings: _Settings) -> np.ndarray:
    """Indices of a training file's records held out for evaluation when no eval_path is set:
    min(eval_size, n // 10) of them, chosen by eval_seed (the same set in every run and process)."""
    count = min(settings.eval_size, n // 10)
    return np.sort(np.random.default_rng(settings.eval_seed).permutation(n)[:count])


def _file_split(settings: _Settings, tokenizer: Any, split: str) -> _Tokenized:
    """A training file's records without (split="train") or only (split="eval") the held-out ones."""
    tokenized = _tokenize(file_records(settings.path, settings.prompt_field), tokenizer, settings)
    held = _held_out(len(tokenized.ids), settings)
    keep = held if split == "eval" else np.setdiff1d(np.arange(len(tokenized.ids)), held)
    return _subset(tokenized, keep)


def _local_batch_size(batch_size: int, process_count: int, name: str) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"{name}={batch_size} must be a positive multiple of the number of "
            f"hosts ({process_count}): each host takes an equal share."
        )
    return batch_size // process_count


# ---------------------------------------------------------------------------------------------
# Public entry points.


class PromptDataset:
    """This host's training prompts: a checkpointable iterator of `PromptBatch`es and counters.

    iterator:          grain DatasetIterator; save/restore it with grain.checkpoint.
    local_batch_size:  prompts per batch on this host (prompts_per_step / process_count).
    buckets:           the padded widths batches use.
    columns:           the record columns passed to rewards as fields.
    num_records:       records this host cycles through (after over-long handling).
    overlong_dropped / overlong_truncated: over-long prompts dropped / truncated (all hosts').
    task:              the built-in task, or None for file data.
    """

    def __init__(
        self,
        data: _Tokenized,
        columns: list[str],
        settings: _Settings,
        *,
        local_batch_size: int,
        seed: int,
        pad_id: int,
        task: tasks.Task | None,
    ):
        self.local_batch_size = local_batch_size
        self.buckets = settings.buckets
        self.columns = columns
        self.num_records = len(data.ids)
        self.overlong_dropped = data.dropped
        self.overlong_truncated = data.truncated
        self.task = task
        epochs = settings.num_epochs
        if epochs is not None and self.num_records * epochs < local_batch_size:
            raise ValueError(
                f"{self.num_records} records x {epochs} epochs on this host is less than one "
                f"batch of {local_batch_size}: add records, epochs, or lower prompts_per_step."
            )
        dataset = grain.MapDataset.range(self.num_records)
        if settings.shuffle:
            # grain reshuffles epoch e with seed + e; a hashed seed keeps run s's second epoch
            # from repeating run s+1's first.
            shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
            dataset = dataset.shuffle(seed=shuffle_seed)
        dataset = (
            dataset.repeat(epochs)
            .batch(local_batch_size, drop_remainder=True)
            .map(lambda idx: _collate(data, columns, idx, self.buckets, pad_id))
        )
        # Records are already in memory and collating is cheap: read synchronously (no threads).
        read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self.iterator = iter(dataset.to_iter_dataset(read_options))

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.local_batch_size

    def __iter__(self) -> PromptDataset:
        return self

    def __next__(self) -> PromptBatch:
        return next(self.iterator)

    def metrics(self) -> dict[str, int]:
        return {
            "data/overlong_dropped": self.overlong_dropped,
            "data/overlong_truncated": self.overlong_truncated,
        }


def make_prompt_dataset(
    cfg_data: Any,
    tokenizer: Any,
    *,
    prompts_per_step: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    hold_out: bool = False,
) -> PromptDataset:
    """The training prompt stream for this host.

    prompts_per_step: prompts per step over ALL hosts; each host gets an equal share of the
      batch and a disjoint, equal-sized share of the records (see `_host_indices`).
    seed: seeds the task's train records and the shuffle.
    hold_out: with a training file and no eval_path, leave out the records `eval_batches`
      evaluates on (min(eval_size, 10%)).
    """
    settings = _read_settings(cfg_data)
    local = _local_batch_size(prompts_per_step, process_count, "prompts_per_step")
    task = None
    if settings.path and hold_out and not settings.eval_path:
        tokenized = _file_split(settings, tokenizer, "train")
    elif settings.path:
        tokenized = _tokenize(file_records(settings.path, settings.prompt_field), tokenizer, settings)
    else:
        task = tasks.get_task(settings.task, **settings.task_kwargs)
        tokenized = _tokenize(task_records(task, "train", seed, settings.train_size), tokenizer, settings)
    columns = tokenized.records.columns()
    mine = _subset(tokenized, _host_indices(len(tokenized.ids), process_index, process_count, "training"))
    return PromptDataset(
        mine, columns, settings, local_batch_size=local, seed=seed, pad_id=_pad_id(tokenizer), task=task
    )


def eval_batches(
    cfg_data: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    hold_out: bool = False,
) -> list[PromptBatch]:
    """This host's share of the fixed eval set as batches, padded like training batches.

    The eval set is `data.eval_path` if set, else the task's eval split when the run trains on a
    task, else (hold_out) the records of the training file that `make_prompt_dataset(hold_out=True)`
    leaves out, else empty ([]). batch_size counts prompts over all hosts. Every host returns the same
    number of batches of batch_size / process_count rows; rows past the end of the set repeat
    a real record and are marked `valid=False`, so shapes stay fixed and nothing is counted twice.
    """
    settings = _read_settings(cfg_data)
    local = _local_batch_size(batch_size, process_count, "eval batch_size")
    if settings.eval_path:
        tokenized = _tokenize(file_records(settings.eval_path, settings.prompt_field), tokenizer, settings)
    elif not settings.path:
        task = tasks.get_task(settings.task, **settings.task_kwargs)
        tokenized = _tokenize(task_records(task, "eval", settings.eval_seed, settings.eval_size), tokenizer, settings)
    elif hold_out:
        tokenized = _file_split(settings, tokenizer, "eval")
        if not tokenized.ids:
            return []  # a file of under 10 records holds nothing out
    else:
        return []
    total = len(tokenized.ids)
    if total < process_count:
        raise ValueError(f"{total} eval records cannot be shared by {process_count} hosts.")
    mine = list(range(process_index, total, process_count))
    num_batches = math.ceil(math.ceil(total / process_count) / local)
    filler = num_batches * local - len(mine)
    indices = mine + [mine[0]] * filler
    valid = np.arange(len(indices)) < len(mine)
    columns = tokenized.records.columns()
    pad_id = _pad_id(tokenizer)
    return [
        _collate(
            tokenized,
            columns,
            indices[b * local : (b + 1) * local],
            settings.buckets,
            pad_id,
            valid[b * local : (b + 1) * local],
        )
        for b in range(num_batches)
    ]


def config_errors(cfg_data: Any) -> list[str]:
    """Problems with the `data.*` keys: values, and the task or files the run reads (not their records)."""
    try:
        settings = _read_settings(cfg_data)
    except ValueError as e:
        return [f"--config.data: {e}"]
    if not settings.path:
        if settings.task in tasks.TASKS:
            return []
        return [
            f"--config.data.task: {settings.task!r}: set data.task to a built-in task {sorted(tasks.TASKS)} "
            "or data.path to a JSONL/Parquet file"
        ]
    errors = []
    for key, value in (("path", settings.path), ("eval_path", settings.eval_path)):
        patterns = value.split(",") if isinstance(value, str) else list(value)
        missing = [p for p in patterns if p.strip() and not glob.glob(p.strip())]
        if missing:
            errors.append(f"--config.data.{key}: no file matches {missing}")
    return errors
