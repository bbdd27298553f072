"""python -m gspo_jax.export writes an HF directory that transformers loads and generates from like JAX."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import micro_config as micro
from gspo_jax import sharding
from gspo_jax.checkpoint import Checkpointer
from gspo_jax.sampler import Sampler
from gspo_jax.policy import abstract_train_state
from gspo_jax.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
PROMPTS = ["31425=", "90817=", "55123=", "70264="]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("export") / "run"
    cfg = micro.override(
        micro.get_config(),
        workdir=str(workdir),
        steps=2,
        **{"eval.every": 0, "warmstart.steps": 30, "warmstart.eval_every": 0},
    )
    Trainer(cfg).run()
    return cfg


def _jax_greedy(cfg, prompts, max_new_tokens, tokenizer):
    target, graphdef = abstract_train_state(cfg, sharding.make_mesh(cfg.mesh))
    with Checkpointer(cfg.workdir, async_save=False) as ckpt:
        state, _, _ = ckpt.restore(target, None)
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, ids))
    prompt_ids = np.array([[0] * (width - len(i)) + i for i in ids], np.int32)
    mask = (np.arange(width)[None] >= width - np.array([len(i) for i in ids])[:, None]).astype(np.int32)
    sampler = Sampler(
        graphdef,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop_ids=(tokenizer.eos_token_id,),
        pad_id=tokenizer.pad_token_id,
    )
    out = sampler(state["train"].params, prompt_ids, mask, jax.random.key(0))
    return [
        list(np.asarray(r)[np.asarray(m).astype(bool)])
        for r, m in zip(out.completion_ids, out.completion_mask)
    ]


def test_export_cli_writes_hf_dir_that_generates_like_jax(trained, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "gspo_jax.export", f"--workdir={trained.workdir}", f"--to_hf={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    with open(out / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == 2

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    expected = _jax_greedy(trained, PROMPTS, 8, tokenizer)
    for prompt, jax_ids in zip(PROMPTS, expected):
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        hf_ids = generated[0, inputs["input_ids"].shape[1] :].tolist()
        assert [int(t) for t in jax_ids] == hf_ids, prompt


def test_export_of_a_missing_step_lists_the_steps_that_exist(trained, tmp_path):
    from gspo_jax.export import export_checkpoint

    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 .*steps that exist: \[0, 1, 2\]"):
        export_checkpoint(trained.workdir, str(tmp_path / "hf"), step=7)
    assert not (tmp_path / "hf").exists()
    assert export_checkpoint(trained.workdir, str(tmp_path / "hf1"), step=1) == 1  # an older step of the run
    assert (tmp_path / "hf1" / "tokenizer.json").is_file()
