"""Tokenizers: a built-in character tokenizer for offline runs, or a local HF model's tokenizer.

The built-in tokenizer maps every character to one token, so the default run needs no download
and its tiny model has a tiny vocabulary (`len(builtin_tokenizer())` == 64). It is a regular
`transformers` fast tokenizer: `save_pretrained` writes an HF directory that
`AutoTokenizer.from_pretrained` loads back unchanged.
"""

from __future__ import annotations

import json
import os

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, pad first so pad id == 0
BUILTIN_CHARACTERS = (
    "0123456789"
    "+-*=,() "
    "abcdefghijklmnopqrstuvwxyz"
    ":.<>/\\{}[]"  # enough for `\boxed{..}` and `<answer>..</answer>` output
    "\n?!#_|"
)


def builtin_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory: 4 special tokens + 60 characters.

    Ids: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then `BUILTIN_CHARACTERS` in order.
    Encoding never adds special tokens (there is no post-processor), and decoding joins tokens
    with nothing in between, so `decode(encode(s)) == s` for any string of those characters.
    Characters outside the vocabulary encode to `<unk>`.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(BUILTIN_CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # `[\s\S]` matches any single character, newline included.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # WordLevel's default decoding puts a space between tokens; Fuse concatenates them.
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # The default clean-up deletes spaces before punctuation and breaks the round trip.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(hf_path: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The built-in tokenizer when `hf_path` is None or "", else the tokenizer of a local HF dir.

    Only local files are read (never the hub). A tokenizer without a pad token gets its eos
    token as pad token: prompts are left-padded and padded positions are always masked, so the
    pad id's value never reaches the model's output.
    """
    if not hf_path:
        return builtin_tokenizer()
    if not os.path.isdir(hf_path):
        raise ValueError(
            f"tokenizer path {hf_path!r} is not a directory: give a local HF model directory "
            "(with tokenizer.json / tokenizer_config.json), or leave it empty for the built-in "
            "tokenizer."
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_path, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer in {hf_path!r} has neither a pad nor an eos token: add "
                '"pad_token" or "eos_token" to its tokenizer_config.json.'
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_token_ids(
    tokenizer: transformers.PreTrainedTokenizerBase, hf_path: str | None = None
) -> tuple[int, ...]:
    """Token ids that end a completion: the tokenizer's eos, then generation_config.json's.

    HF `generate` stops at `generation_config.eos_token_id` (an int or a list; chat models
    often list their end-of-turn token there), so sampling must stop at those too.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config_path = os.path.join(hf_path, "generation_config.json") if hf_path else ""
    if config_path and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            configured = json.load(f).get("eos_token_id")
        if isinstance(configured, int):
            configured = [configured]
        ids.extend(int(i) for i in configured or ())
    if not ids:
        raise ValueError(
            "the tokenizer has no eos token and no generation_config.json names one: set "
            "eos_token in tokenizer_config.json or eos_token_id in generation_config.json."
        )
    return tuple(dict.fromkeys(ids))
