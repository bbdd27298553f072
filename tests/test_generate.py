"""`python -m gspo_jax.generate` reproduces transformers' greedy `generate`, EOS stop included."""

import json
import shutil

import pytest
import torch
from absl import app, flags
from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo_jax import generate
from gspo_jax.tokenizer import builtin_tokenizer
from hf_models import build_hf_model

PROMPT = "12+34="
N = 10


def run_cli(capsys, *args):
    generate.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["generate", *args])
    generate.main([])
    return capsys.readouterr().out.strip()


def hf_generate(path, tokenizer, n, input_ids=None):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(PROMPT)["input_ids"] if input_ids is None else input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tiny random model + the built-in tokenizer in one directory; EOS forced to occur mid-completion."""
    tokenizer = builtin_tokenizer()
    hf = build_hf_model("qwen3", weight_std=0.3)
    with torch.no_grad():
        free = hf.generate(
            **tokenizer(PROMPT, return_tensors="pt"),
            do_sample=False,
            max_new_tokens=N,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    forced_eos = int(free[0, len(PROMPT) + 3])  # the greedy token at step 4 becomes an EOS id
    hf.generation_config.eos_token_id = [tokenizer.eos_token_id, forced_eos]
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("generate")
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    yield str(path), tokenizer
    flags.FLAGS.unparse_flags()


def test_cli_json_matches_transformers_generate_and_stops_at_eos(model_dir, capsys):
    path, tokenizer = model_dir
    expected = hf_generate(path, tokenizer, N)
    assert len(expected) <= 4, "the forced EOS should end transformers' completion early"
    result = json.loads(
        run_cli(
            capsys,
            f"--hf_path={path}",
            f"--prompt={PROMPT}",
            f"--max_new_tokens={N}",
            "--temperature=0",
            "--json",
        )
    )
    assert result["completion_ids"] == expected
    assert result["stopped_at_eos"] and result["prompt_ids"] == tokenizer(PROMPT)["input_ids"]
    assert result["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    text = run_cli(
        capsys, f"--hf_path={path}", f"--prompt={PROMPT}", f"--max_new_tokens={N}", "--temperature=0"
    )
    assert text == result["completion"].strip()


def test_cli_errors_name_the_fix(model_dir, capsys):
    path, _ = model_dir
    with pytest.raises(app.UsageError, match="--prompt"):
        run_cli(capsys, f"--hf_path={path}")
    with pytest.raises(ValueError, match="non-empty --prompt"):
        run_cli(capsys, f"--hf_path={path}", "--prompt=")


def test_cli_with_chat_template_several_prompts_and_a_prompts_file(model_dir, capsys, tmp_path):
    path, tokenizer = model_dir
    chat_dir = tmp_path / "chat_model"
    shutil.copytree(path, chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer.save_pretrained(chat_dir)
    chat = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text(json.dumps({"prompt": chat}) + "\n" + json.dumps({"prompt": "5+5="}) + "\n")
    lines = run_cli(
        capsys,
        f"--hf_path={chat_dir}",
        "--prompt=12+34=",
        "--prompt=9=",
        f"--prompts_file={prompts_file}",
        "--chat_template",
        f"--max_new_tokens={N}",
        "--json",
    ).splitlines()
    # The chat template rendered by hand: text prompts become one user message.
    rendered = ["<user>12+34=<assistant>", "<user>9=<assistant>", "<system>add<user>1+2=<assistant>"]
    rendered.append("<user>5+5=<assistant>")
    assert len(lines) == 4
    for line, text in zip(lines, rendered):
        result = json.loads(line)
        assert result["prompt_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        # One left-padded batch gives each prompt the completion transformers gives it alone.
        assert result["completion_ids"] == hf_generate(str(chat_dir), tokenizer, N, result["prompt_ids"])
    assert json.loads(lines[2])["prompt"] == chat
