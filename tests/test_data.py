"""Prompt pipelines: loading, validation, padding/buckets, over-long handling, shuffling,
per-host sharding, epochs, checkpointing with grain + Orbax, chat templates, eval batches."""

import dataclasses
import json
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gspo_jax import data, tasks
from gspo_jax import tokenizer as tk
from gspo_jax.warmstart import build_supervised_set

# Built-in tokenizer ids (by its documented layout): pad 0, bos 1, digit d -> 4 + d, '=' -> 17.
PAD, BOS, EQ = 0, 1, 17


def digit_ids(text):
    return [4 + int(c) for c in text]


@pytest.fixture(scope="module")
def tok():
    return tk.builtin_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def file_config(path, **overrides):
    """A plain-dict data config (a ConfigDict is tested with the built-in task)."""
    return {"path": path, "shuffle": False, "buckets": (4, 8, 16), "max_prompt_len": 16, **overrides}


def take(dataset, n):
    return [next(dataset) for _ in range(n)]


def numbered_records(n):
    return [{"prompt": f"{i}=", "answer": str(i), "id": i} for i in range(n)]


def test_jsonl_batches_are_left_padded_to_the_smallest_fitting_bucket(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "12", "answer": "a"},
            {"prompt": "34567", "answer": "b"},
            {"prompt": "1", "answer": "c"},
            {"prompt": "2", "answer": "d"},
        ],
    )
    ds = data.make_prompt_dataset(file_config(path), tok, prompts_per_step=2, seed=0)
    first, second = take(ds, 2)
    # Longest prompt has 5 tokens -> bucket 8.
    np.testing.assert_array_equal(
        first.prompt_ids,
        [
            [PAD] * 6 + digit_ids("12"),
            [PAD] * 3 + digit_ids("34567"),
        ],
    )
    np.testing.assert_array_equal(first.prompt_mask, [[0] * 6 + [1] * 2, [0] * 3 + [1] * 5])
    assert first.prompt_ids.dtype == np.int32 and first.prompt_mask.dtype == np.int32
    assert first.prompts == ["12", "34567"] and first.fields == {"answer": ["a", "b"]}
    assert first.valid.tolist() == [True, True]
    # Longest prompt has 1 token -> bucket 4.
    np.testing.assert_array_equal(second.prompt_ids, [[PAD] * 3 + digit_ids("1"), [PAD] * 3 + digit_ids("2")])
    assert ds.columns == ["answer"] and ds.buckets == (4, 8, 16) and ds.steps_per_epoch == 2


def test_parquet_glob_and_list_sources(tmp_path, tok):
    pq.write_table(pa.table({"prompt": ["11", "22"], "answer": ["x", "y"]}), tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "33", "answer": "z"}, {"prompt": "44"}])
    for path in (
        str(tmp_path / "*"),
        [str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")],
        f"{tmp_path / 'a.parquet'},{tmp_path / 'b.jsonl'}",
    ):
        ds = data.make_prompt_dataset(file_config(path), tok, prompts_per_step=4, seed=0)
        batch = next(ds)
        assert batch.prompts == ["11", "22", "33", "44"]
        # A column a record lacks reaches rewards as None.
        assert batch.fields == {"answer": ["x", "y", "z", None]}
        np.testing.assert_array_equal(batch.prompt_ids[0], [PAD, PAD] + digit_ids("11"))


def test_buckets_above_max_prompt_len_are_replaced_by_it(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1" * 18}])
    cfg = file_config(path, buckets=(16, 32, 64), max_prompt_len=20)
    ds = data.make_prompt_dataset(cfg, tok, prompts_per_step=1, seed=0)
    assert ds.buckets == (16, 20)
    assert next(ds).prompt_ids.shape == (1, 20)


@pytest.mark.parametrize(
    "mode,prompts,dropped,truncated",
    [
        ("drop", ["12"], 2, 0),
        ("truncate", ["12", "123456", "1234567"], 0, 2),
    ],
)
def test_overlong_drop_and_truncate_are_counted(tmp_path, tok, mode, prompts, dropped, truncated):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p} for p in ("12", "123456", "1234567")])
    cfg = file_config(path, max_prompt_len=4, buckets=(4,), overlong=mode)
    ds = data.make_prompt_dataset(cfg, tok, prompts_per_step=len(prompts), seed=0)
    assert (ds.overlong_dropped, ds.overlong_truncated) == (dropped, truncated)
    assert ds.metrics() == {"data/overlong_dropped": dropped, "data/overlong_truncated": truncated}
    batch = next(ds)
    assert batch.prompts == prompts
    if mode == "truncate":  # the last 4 tokens are kept
        np.testing.assert_array_equal(
            batch.prompt_ids, [[PAD, PAD] + digit_ids("12"), digit_ids("3456"), digit_ids("4567")]
        )


def test_truncate_keeps_bos(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "123456"}])
    cfg = file_config(path, max_prompt_len=4, buckets=(4,), overlong="truncate", add_bos=True)
    batch = next(data.make_prompt_dataset(cfg, tok, prompts_per_step=1, seed=0))
    np.testing.assert_array_equal(batch.prompt_ids, [[BOS] + digit_ids("456")])


def test_overlong_error_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12"}, {"prompt": "123456"}])
    cfg = file_config(path, max_prompt_len=4, buckets=(4,), overlong="error")
    match = r"d\.jsonl:line 2: the prompt has 6 tokens.*max_prompt_len"
    with pytest.raises(ValueError, match=match):
        data.make_prompt_dataset(cfg, tok, prompts_per_step=1, seed=0)


@pytest.mark.parametrize(
    "lines,match",
    [
        # The blank line 2 is skipped but still counted.
        (['{"prompt": "12"}', "", '{"prompt": ""}'], r"d\.jsonl:line 3: the prompt must be a non"),
        (['{"prompt": "12"}', '{"prompt": "   "}'], r"d\.jsonl:line 2: the prompt must be a non-empty"),
        (['{"question": "12"}'], r"d\.jsonl:line 1: record has no 'prompt' field"),
        (['{"prompt": 12}'], r"d\.jsonl:line 1: the prompt must be a non-empty string"),
        (['{"prompt": "12"}', '{"prompt": '], r"d\.jsonl:line 2: not valid JSON"),
        (['["12"]'], r"d\.jsonl:line 1: a record must be a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, tok, lines, match):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        data.make_prompt_dataset(file_config(str(path)), tok, prompts_per_step=1, seed=0)


def test_bad_parquet_row_is_named(tmp_path, tok):
    pq.write_table(pa.table({"prompt": ["12", "", "3"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet:row 2: the prompt must be a non-empty"):
        data.make_prompt_dataset(file_config(str(tmp_path / "d.parquet")), tok, prompts_per_step=1, seed=0)


def test_prompt_field_option(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "12", "answer": "3"}])
    ds = data.make_prompt_dataset(file_config(path, prompt_field="question"), tok, prompts_per_step=1, seed=0)
    batch = next(ds)
    assert batch.prompts == ["12"] and batch.fields == {"answer": ["3"]}


def test_missing_file_and_bad_suffix(tmp_path, tok):
    with pytest.raises(ValueError, match="not found"):
        data.make_prompt_dataset(file_config(str(tmp_path / "none.jsonl")), tok, prompts_per_step=1, seed=0)
    (tmp_path / "d.csv").write_text("prompt\n1\n")
    with pytest.raises(ValueError, match="must end in one of"):
        data.make_prompt_dataset(file_config(str(tmp_path / "d.csv")), tok, prompts_per_step=1, seed=0)


def epoch_ids(ds, steps):
    return [b.fields["id"] for b in take(ds, steps)]


def test_shuffle_is_deterministic_and_reshuffled_each_epoch(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_records(16))
    cfg = file_config(path, shuffle=True, num_epochs=2)

    def run(seed):
        ds = data.make_prompt_dataset(cfg, tok, prompts_per_step=4, seed=seed)
        ids = [i for batch in epoch_ids(ds, 8) for i in batch]
        with pytest.raises(StopIteration):
            next(ds)
        return ids

    ids = run(seed=7)
    assert ids == run(seed=7)
    assert ids != run(seed=8)
    first, second = ids[:16], ids[16:]
    assert sorted(first) == sorted(second) == list(range(16))  # each epoch sees every record once
    assert first != second and first != list(range(16))


def test_epochs_without_shuffle_repeat_in_order_and_forever(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_records(4))
    ds = data.make_prompt_dataset(file_config(path), tok, prompts_per_step=3, seed=0)
    # num_epochs=None repeats forever; batches run across epoch boundaries.
    assert epoch_ids(ds, 4) == [[0, 1, 2], [3, 0, 1], [2, 3, 0], [1, 2, 3]]


@pytest.mark.parametrize("n_records,hosts", [(12, 2), (12, 3), (13, 2)])
def test_hosts_get_disjoint_equal_shares(tmp_path, tok, n_records, hosts):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_records(n_records))
    cfg = file_config(path, shuffle=True, num_epochs=1)
    per_host = n_records // hosts
    shares = []
    for host in range(hosts):
        ds = data.make_prompt_dataset(
            cfg, tok, prompts_per_step=hosts, seed=3, process_index=host, process_count=hosts
        )
        assert ds.local_batch_size == 1 and ds.num_records == per_host
        shares.append({i for batch in epoch_ids(ds, per_host) for i in batch})
        with pytest.raises(StopIteration):
            next(ds)
    assert sum(len(s) for s in shares) == len(set().union(*shares)) == per_host * hosts
    # Divisible: every record is seen; otherwise at most hosts - 1 are left out.
    assert n_records - len(set().union(*shares)) == n_records % hosts


def test_prompts_per_step_must_split_over_hosts(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_records(8))
    with pytest.raises(ValueError, match="multiple of the number of hosts"):
        data.make_prompt_dataset(
            file_config(path), tok, prompts_per_step=3, seed=0, process_index=0, process_count=2
        )


def assert_same_batches(got, expected):
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        np.testing.assert_array_equal(a.prompt_mask, b.prompt_mask)
        assert a.prompts == b.prompts and a.fields == b.fields


def test_iterator_restores_through_orbax_composite(tmp_path, tok):
    cfg = data.default_data_config()
    cfg.train_size = 40
    cfg.buckets = (8,)

    def fresh():
        return data.make_prompt_dataset(cfg, tok, prompts_per_step=6, seed=5)

    uninterrupted = fresh()
    take(uninterrupted, 5)  # crosses the first epoch boundary (40 records / 6)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(
        tmp_path / "ckpt", ocp.args.Composite(data=grain.checkpoint.CheckpointSave(uninterrupted.iterator))
    )
    expected = take(uninterrupted, 8)

    resumed = fresh()
    checkpointer.restore(
        tmp_path / "ckpt", ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed.iterator))
    )
    assert_same_batches(take(resumed, 8), expected)

    # The plain get_state / set_state API does the same.
    other = fresh()
    other.iterator.set_state(json.loads(json.dumps(uninterrupted.iterator.get_state())))
    assert_same_batches(take(other, 3), take(uninterrupted, 3))


def chat_tokenizer():
    tokenizer = tk.builtin_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def test_chat_template_applied_when_asked(tmp_path):
    tokenizer = chat_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12="}])
    cfg = file_config(path, buckets=(32,), max_prompt_len=32, chat_template=True)
    batch = next(data.make_prompt_dataset(cfg, tokenizer, prompts_per_step=1, seed=0))
    text = "<user>12=<assistant>"
    np.testing.assert_array_equal(batch.prompt_ids[0, -len(text) :], tokenizer(text)["input_ids"])
    assert batch.prompt_mask[0].sum() == len(text)
    assert tokenizer.decode(batch.prompt_ids[0][batch.prompt_mask[0] == 1]) == text
    assert batch.prompts == ["12="]  # rewards see the prompt as written

    plain = next(
        data.make_prompt_dataset(
            file_config(path, buckets=(32,), max_prompt_len=32), tokenizer, prompts_per_step=1, seed=0
        )
    )
    assert plain.prompt_mask.sum() == 3


def test_chat_template_missing_falls_back_with_warning(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12="}])
    with caplog.at_level(logging.WARNING):
        batch = next(
            data.make_prompt_dataset(file_config(path, chat_template=True), tok, prompts_per_step=1, seed=0)
        )
    assert "no chat template" in caplog.text
    np.testing.assert_array_equal(batch.prompt_ids[0], [PAD] + digit_ids("12") + [EQ])


def test_add_bos(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12="}])
    batch = next(data.make_prompt_dataset(file_config(path, add_bos=True), tok, prompts_per_step=1, seed=0))
    np.testing.assert_array_equal(batch.prompt_ids[0], [BOS] + digit_ids("12") + [EQ])


def test_builtin_task_source_and_eval_batches(tok):
    cfg = data.default_data_config()
    cfg.task = "addition"
    cfg.task_kwargs = {"num_digits": 2}
    cfg.train_size = 64
    cfg.eval_size = 10
    ds = data.make_prompt_dataset(cfg, tok, prompts_per_step=8, seed=0)
    assert isinstance(ds.task, tasks.Task) and ds.task.name == "addition"
    batch = next(ds)
    assert batch.prompt_ids.shape == (8, 16)
    for prompt, answer in zip(batch.prompts, batch.fields["answer"]):
        a, b = prompt[:-1].split("+")
        assert answer == str(int(a) + int(b))

    evals = data.eval_batches(cfg, tok, batch_size=4)
    assert len(evals) == 3
    assert [b.valid.tolist() for b in evals][-1] == [True, True, False, False]
    eval_prompts = [p for b in evals for p, v in zip(b.prompts, b.valid) if v]
    assert eval_prompts == [r["prompt"] for r in ds.task.records("eval", 0, 10)]
    assert not set(eval_prompts) & {r["prompt"] for r in ds.task.records("train", 0, 64)}

    # Two hosts: equal batch counts, disjoint valid rows that cover the eval set.
    shares = [data.eval_batches(cfg, tok, batch_size=4, process_index=h, process_count=2) for h in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    assert all(b.prompt_ids.shape[0] == 2 for s in shares for b in s)
    valid = [p for s in shares for b in s for p, v in zip(b.prompts, b.valid) if v]
    assert sorted(valid) == sorted(eval_prompts)


def test_eval_from_file_or_none(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_records(4))
    assert data.eval_batches(file_config(path), tok, batch_size=2) == []
    eval_path = write_jsonl(tmp_path / "e.jsonl", numbered_records(3))
    batches = data.eval_batches(file_config(path, eval_path=eval_path), tok, batch_size=2)
    assert [b.prompts for b in batches] == [["0=", "1="], ["2=", "0="]]
    assert [b.valid.tolist() for b in batches] == [[True, True], [True, False]]


def test_config_forms_and_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_records(4))

    DataConfig = dataclasses.make_dataclass(  # noqa: N806
        "DataConfig", [("path", str, dataclasses.field(default=path)), ("shuffle", bool, False)]
    )
    config_dict = data.default_data_config()
    config_dict.path, config_dict.shuffle = path, False
    for cfg in (DataConfig(), {"path": path, "shuffle": False}, config_dict):
        ds = data.make_prompt_dataset(cfg, tok, prompts_per_step=2, seed=0)
        assert next(ds).prompts == ["0=", "1="]
    assert data.configured_task({"path": path}) is None
    assert data.configured_task({"task": "sort_digits"}).name == "sort_digits"
    bad = [
        ({"pth": path}, "unknown data config keys"),
        ({"path": path, "overlong": "cut"}, "overlong"),
        ({"path": path, "num_epochs": 0}, "num_epochs"),
        ({"task": "nope"}, "unknown task"),
        ({"path": path, "add_bos": True, "max_prompt_len": 0}, "max_prompt_len"),
    ]
    for cfg, match in bad:
        with pytest.raises(ValueError, match=match):
            data.make_prompt_dataset(cfg, tok, prompts_per_step=2, seed=0)
    with pytest.raises(ValueError, match="less than one batch"):
        data.make_prompt_dataset({"path": path, "num_epochs": 1}, tok, prompts_per_step=8, seed=0)


def rendered(messages):
    """chat_tokenizer's template rendered by hand (the independent reference)."""
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_chat_records_go_through_the_chat_template(tmp_path):
    tokenizer = chat_tokenizer()
    chat = [{"role": "system", "content": "sort"}, {"role": "user", "content": "31="}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": chat, "answer": "13"}, {"prompt": "12="}])
    # Without data.chat_template only the chat record is templated; with it, the text one too.
    for chat_template, second in ((False, "12="), (True, "<user>12=<assistant>")):
        cfg = file_config(path, buckets=(64,), max_prompt_len=64, chat_template=chat_template, add_bos=True)
        batch = next(data.make_prompt_dataset(cfg, tokenizer, prompts_per_step=2, seed=0))
        for row, text in enumerate((rendered(chat), second)):
            got = batch.prompt_ids[row][batch.prompt_mask[row] == 1].tolist()
            assert got == [BOS] + tokenizer(text, add_special_tokens=False)["input_ids"]
        assert batch.prompts == [chat, "12="]  # rewards see the prompt as written, as in TRL
        assert batch.fields["answer"] == ["13", None]


@pytest.mark.parametrize(
    "prompt,match",
    [
        ([], r"line 1: the prompt is an empty list of messages"),
        (["hi"], r"line 1: message 0 of the prompt must be an object with \"role\" and \"content\""),
        ([{"role": "user"}], r"line 1: message 0 of the prompt must be an object"),
        ([{"role": "", "content": "x"}], r"line 1: message 0 has role ''"),
        ([{"role": "user", "content": 3}], r"line 1: message 0 \(user\) has content of type int"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            r"line 1: the prompt's last message is from the assistant",
        ),
        ([{"role": "user", "content": " "}], r"line 1: every message of the prompt is empty"),
        ({"role": "user", "content": "x"}, r"line 1: the prompt must be a non-empty string or a list"),
    ],
)
def test_bad_chat_records_name_file_line_and_fix(tmp_path, prompt, match):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt}])
    with pytest.raises(ValueError, match=match):
        data.make_prompt_dataset(file_config(path), chat_tokenizer(), prompts_per_step=1, seed=0)


def test_chat_records_need_a_tokenizer_with_a_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "1="}]}])
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        data.make_prompt_dataset(file_config(path), tok, prompts_per_step=1, seed=0)


def test_warm_start_prompts_are_encoded_like_rl_prompts():
    tokenizer = chat_tokenizer()
    cfg = data.default_data_config()
    cfg.update(train_size=8, buckets=(32,), max_prompt_len=32, chat_template=True, add_bos=True)
    batch = next(data.make_prompt_dataset(cfg, tokenizer, prompts_per_step=1, seed=0))
    prompt = batch.prompts[0]
    expected = [BOS] + tokenizer(f"<user>{prompt}<assistant>", add_special_tokens=False)["input_ids"]
    assert batch.prompt_ids[0][batch.prompt_mask[0] == 1].tolist() == expected

    sft = build_supervised_set([(prompt, "12")], data.prompt_encoder(cfg, tokenizer), tokenizer, 2, PAD)
    assert sft.tokens[0][sft.valid[0]].tolist() == expected + digit_ids("12") + [2]
