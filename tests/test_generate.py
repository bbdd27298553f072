"""`python -m gspo_jax.generate` reproduces transformers' greedy `generate`, EOS stop included."""

import json

import pytest
import torch
from absl import app, flags
from transformers import AutoModelForCausalLM

from gspo_jax import generate
from gspo_jax.tokenizer import builtin_tokenizer
from hf_models import build_hf_model

PROMPT = "12+34="
N = 10


def run_cli(capsys, *args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["generate", *args])
    generate.main([])
    return capsys.readouterr().out.strip()


def hf_generate(path, tokenizer, n):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=n)
    return out[0, encoded["input_ids"].shape[1] :].tolist()


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
