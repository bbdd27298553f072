"""Built-in tokenizer: exact round trip, HF save/load, special-token handling, eos ids."""

import json

import pytest
import transformers

from gspo_jax import tokenizer as tk

ROUND_TRIP_CASES = [
    "31425=",
    "47+85=132",
    "a  b . x , ( ) ",  # spaces before punctuation must survive (no clean-up on decode)
    "\\boxed{12} <answer>3</answer>",
    "f(x) = [1, 2]: {a/b} * c - d\n#_|?!",
    " leading and trailing ",
]


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_round_trip_is_exact(text):
    tok = tk.builtin_tokenizer()
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tok.decode(ids) == text


def test_ids_of_special_tokens_and_characters():
    tok = tk.builtin_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    )
    # Digits follow the four special tokens in order.
    assert tok("0123456789")["input_ids"] == list(range(4, 14))
    assert len(tok) == 64


def test_no_special_tokens_added_and_skipped_on_decode():
    tok = tk.builtin_tokenizer()
    assert tok("12")["input_ids"] == [5, 6]
    assert tok("12", add_special_tokens=True)["input_ids"] == [5, 6]
    assert tok.decode([1, 5, 6, 2, 0, 0], skip_special_tokens=True) == "12"
    assert tok.decode([1, 5, 2]) == "<bos>1<eos>"


def test_unknown_characters_map_to_unk():
    tok = tk.builtin_tokenizer()
    assert tok("A1")["input_ids"] == [3, 5]


def test_save_and_load_round_trip(tmp_path):
    tok = tk.builtin_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in ROUND_TRIP_CASES:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert len(loaded) == len(tok)
    # load_tokenizer reads the same directory.
    assert tk.load_tokenizer(str(tmp_path))("31425=")["input_ids"] == tok("31425=")["input_ids"]


def test_load_tokenizer_builtin_for_empty_path():
    for path in (None, ""):
        assert len(tk.load_tokenizer(path)) == 64


def test_load_tokenizer_sets_missing_pad_to_eos(tmp_path):
    tok = tk.builtin_tokenizer()
    tok.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded = tk.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == 2


def test_load_tokenizer_missing_dir_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        tk.load_tokenizer(str(tmp_path / "nope"))


def test_eos_token_ids_include_generation_config(tmp_path):
    tok = tk.builtin_tokenizer()
    assert tk.eos_token_ids(tok) == (2,)
    assert tk.eos_token_ids(tok, str(tmp_path)) == (2,)  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert tk.eos_token_ids(tok, str(tmp_path)) == (2, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert tk.eos_token_ids(tok, str(tmp_path)) == (2, 9)
