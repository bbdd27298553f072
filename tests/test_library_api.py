"""The library surface a user touches first: from_pretrained / save_pretrained, the README snippet,
CLI modules imported together."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

import gspo_jax
from gspo_jax import PRESETS, QwenMoeForCausalLM
from gspo_jax.tokenizer import builtin_tokenizer
from hf_models import build_hf_model, hf_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = build_hf_model("qwen3")
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return str(path), model


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (jnp.float32, np.float32),
        (jnp.bfloat16, jnp.bfloat16),
        (np.float32, np.float32),
        ("bfloat16", jnp.bfloat16),
        (np.dtype("float32"), np.float32),
        (jnp.dtype("bfloat16"), jnp.bfloat16),
    ],
)
def test_from_pretrained_accepts_any_dtype_like(hf_dir, dtype, expected):
    path, hf = hf_dir
    model = gspo_jax.from_pretrained(path, dtype=dtype)
    assert model.config.dtype == np.dtype(expected).name
    embed = np.asarray(model.embed_tokens.value)
    assert embed.dtype == np.dtype(expected)
    reference = hf.model.embed_tokens.weight.detach().to(torch.float32).numpy().astype(expected)
    np.testing.assert_array_equal(embed, reference)
    assert {np.dtype(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(expected)}


@pytest.mark.parametrize("dtype", ["fp33", jnp.int32, None, 3])
def test_from_pretrained_rejects_nonsense_dtypes(hf_dir, dtype):
    with pytest.raises(ValueError, match=r"dtype=.*use one of \('float32', 'bfloat16', 'float16'\)"):
        gspo_jax.from_pretrained(hf_dir[0], dtype=dtype)


def test_cli_modules_import_together_in_one_process():
    # Each CLI defines its flags when run as a program; at import time two of them would collide
    # (generate and bench both have --max_new_tokens, generate and export --dtype).
    code = "import gspo_jax.train, gspo_jax.generate, gspo_jax.bench, gspo_jax.export, gspo_jax.compare; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_save_pretrained_writes_the_tokenizer(tmp_path):
    tokenizer = builtin_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    model = QwenMoeForCausalLM(PRESETS["tiny"], rngs=nnx.Rngs(params=0))
    gspo_jax.save_pretrained(model, str(tmp_path), tokenizer=tokenizer)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded("31425=")["input_ids"] == [4 + int(c) for c in "31425"] + [17]


def readme_library_snippet() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Use as a library") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_readme_library_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_library_snippet(), "README.md", "exec"), namespace)
    logits, logp = np.asarray(namespace["logits"], np.float64), np.asarray(namespace["logp"])
    # Row t of the completion is predicted by position 3 + t: log_softmax of the model's own logits.
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ids = np.array(namespace["input_ids"])
    want = np.take_along_axis(log_softmax[:, 3:9], ids[:, 4:, None], -1)[..., 0]
    np.testing.assert_allclose(logp, want, atol=1e-5)
    assert np.isfinite(float(namespace["loss"])) and "clip_frac/seq" in namespace["metrics"]
    # "loads in transformers": same logits from the written directory, and the tokenizer with it.
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny_policy_hf")).eval()
    np.testing.assert_allclose(hf_logits(hf, ids), logits, atol=1e-4)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tiny_policy_hf")).decode([5, 6]) == "12"
