"""End-to-end trainer runs on a micro config, config validation, reward and data error paths."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import micro_config as micro
from gspo_jax.rewards import RewardFunctionError
from gspo_jax.train import ConfigError, validate_config
from gspo_jax.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_STEP_KEYS = (
    "step",
    "reward/mean",
    "reward/std",
    "loss",
    "clip_frac/seq",
    "clip_frac/token",
    "ratio/mean",
    "kl",
    "entropy",
    "completion_len/mean",
    "tokens_per_s",
    "step_time_s",
    "moe/expert_load",
)


def micro_config(workdir, **overrides):
    cfg = micro.get_config()
    cfg.workdir = str(workdir)
    return micro.override(cfg, **overrides)


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_micro_run_writes_every_output(tmp_path, caplog):
    cfg = micro_config(tmp_path / "run")
    validate_config(cfg)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        Trainer(cfg).run()
    # Both RL steps have the same shapes, so each phase compiles once (a bug once recompiled the update
    # at step 2 because freshly created optimizer counters were not yet placed on the mesh).
    compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    for phase in ("jit(train)", "jit(score)", "jit(step)"):
        assert sum(phase in m for m in compiled) == 1, (phase, compiled)
    lines = read_lines(tmp_path / "run" / "metrics.jsonl")
    rl_steps = [l for l in lines if l.get("phase") in (None, "rl") and "reward/mean" in l]
    assert [l["step"] for l in rl_steps] == [1, 2]
    for line in rl_steps:
        missing = [k for k in REQUIRED_STEP_KEYS if k not in line]
        assert not missing, missing
        assert len(line["moe/expert_load"]) == 8 and abs(sum(line["moe/expert_load"]) - 1) < 1e-5
        assert 0 <= line["clip_frac/seq"] <= 1 and np.isfinite(line["loss"])
    evals = [l for l in lines if "eval/accuracy" in l]
    assert [(l["step"], l.get("phase")) for l in evals] == [(2, "warmstart"), (0, None), (2, None)]
    assert all("eval/reward/mean" in l for l in evals)
    assert read_lines(tmp_path / "run" / "samples.jsonl")
    assert os.listdir(tmp_path / "run" / "tb")
    assert {"reward.png", "eval_accuracy.png"} <= set(os.listdir(tmp_path / "run" / "plots"))
    assert sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())[-1] == 2


# The second case is the accelerator presets' path: ragged dispatch, bf16 compute and rollout copy,
# rematerialised layers (which once broke the sampler's decode loop).
ACCELERATOR_PATH = {
    "model.moe_dispatch": "ragged",
    "model.dtype": "bfloat16",
    "model.rollout_dtype": "bfloat16",
    "model.remat": True,
}


@pytest.mark.parametrize("model_settings", [{}, ACCELERATOR_PATH], ids=["cpu_path", "accelerator_path"])
def test_sharded_run_on_a_data_expert_tensor_mesh(tmp_path, model_settings):
    cfg = micro_config(
        tmp_path / "mesh",
        **{
            "mesh.num_devices": 8,
            "mesh.data": 2,
            "mesh.expert": 2,
            "mesh.tensor": 2,
            "warmstart.steps": 0,
            "eval.every": 0,
            "steps": 1,
            "algo.old_logprobs": "sampler",
            "algo.importance_sampling_level": "token",
            **model_settings,
        },
    )
    validate_config(cfg)
    trainer = Trainer(cfg)
    assert dict(trainer.mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    expert_weights = trainer.policy.params["layers"][0]["mlp"]["gate_proj"].get_value()
    assert tuple(expert_weights.sharding.spec[:2]) == (None, "expert")  # [layers, E, D, I]
    trainer.run()
    line = read_lines(tmp_path / "mesh" / "metrics.jsonl")[-1]
    # Old log-probs come from the sampler; the first update's fresh forward differs only by float error.
    assert line["logprob_gap/token_abs"] < (5e-2 if model_settings else 1e-3)
    assert np.isfinite(line["loss"])


def test_config_errors_name_the_key_and_fix(tmp_path):
    cfg = micro_config(
        tmp_path / "bad",
        **{
            "rollout.group_size": 1,
            "algo.importance_sampling_level": "seq",
            "algo.minibatches": 3,
            "mesh.num_devices": 0,
            "mesh.data": 3,
            "reward.fns": "no_such_reward",
            "rollout.temperature": 0.0,
        },
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, num_devices=8)
    message = str(err.value)
    for expected in (
        "--config.rollout.group_size: must be >= 2",
        "--config.algo.importance_sampling_level",
        "--config.algo.minibatches: 3 does not divide",
        "--config.mesh",
        "no_such_reward",
        "--config.rollout.temperature",
    ):
        assert expected in message, expected
    assert not os.path.exists(tmp_path / "bad")


def test_experts_not_divisible_by_expert_axis(tmp_path):
    cfg = micro_config(
        tmp_path / "ep",
        **{"mesh.num_devices": 8, "rollout.prompts_per_step": 8, "mesh.data": 1, "mesh.expert": -1},
    )  # 8 experts over 8 devices: fine
    validate_config(cfg, num_devices=8)
    cfg = micro_config(
        tmp_path / "ep",
        **{"mesh.num_devices": 6, "rollout.prompts_per_step": 6, "mesh.data": 2, "mesh.expert": 3},
    )  # 8 experts over 3 devices
    with pytest.raises(ConfigError, match="num_experts must be divisible by mesh.expert"):
        validate_config(cfg)
    with pytest.raises(ValueError, match="num_experts must be divisible by mesh.expert"):
        Trainer(cfg)


def test_cli_fails_fast_on_invalid_config(tmp_path):
    workdir = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gspo_jax.train",
            "--config=configs/qwen_moe.py",
            f"--config.workdir={workdir}",
            "--config.rollout.group_size=1",
            "--config.optim.lr=-1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    assert proc.returncode != 0
    assert "--config.rollout.group_size" in proc.stderr and "--config.optim.lr" in proc.stderr
    assert not workdir.exists()


def test_reward_function_that_raises_stops_the_run_naming_it(tmp_path, monkeypatch):
    module = tmp_path / "flaky_reward.py"
    module.write_text(
        textwrap.dedent("""
      CALLS = []

      def reward(prompts, completions, **fields):
          CALLS.append(1)
          if len(CALLS) >= 2:
              raise ZeroDivisionError("boom")
          return [0.0] * len(completions)
  """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = micro_config(
        tmp_path / "flaky",
        **{"reward.fns": "flaky_reward:reward", "warmstart.steps": 0, "eval.every": 0, "steps": 3},
    )
    with pytest.raises(RewardFunctionError) as err:
        Trainer(cfg).run()
    assert "flaky_reward:reward" in str(err.value) and "boom" in str(err.value)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "flaky" / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == 1  # step 1 finished and is on disk; nothing was deleted


def test_data_file_errors_name_file_and_line(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "12=", "answer": "12"}\n{"prompt": "", "answer": "1"}\n')
    cfg = micro_config(
        tmp_path / "d",
        **{"data.path": str(data), "data.task": "", "warmstart.steps": 0, "reward.fns": "math_answer"},
    )
    with pytest.raises(ValueError, match=r"prompts.jsonl.*line 2"):
        Trainer(cfg)
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_reference_kl_and_grpo_level_run(tmp_path):
    cfg = micro_config(
        tmp_path / "kl",
        **{
            "algo.beta": 0.05,
            "algo.importance_sampling_level": "sequence_token",
            "warmstart.steps": 0,
            "eval.every": 0,
            "steps": 1,
        },
    )
    validate_config(cfg)
    trainer = Trainer(cfg)
    assert trainer.ref_params is not None
    trainer.run()
    line = read_lines(tmp_path / "kl" / "metrics.jsonl")[-1]
    assert "kl_ref" in line and np.isfinite(line["kl_ref"]) and line["kl_ref"] >= 0


@pytest.mark.parametrize("preset", ["qwen3_30b_a3b", "qwen1_5_moe_a2_7b"])
def test_real_presets_validate_with_their_checkpoint_config(tmp_path, preset):
    from configs.qwen_moe import get_config
    from gspo_jax.models.config import PRESETS

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(PRESETS[preset].to_hf_dict()))
    data = tmp_path / "math.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cfg = get_config(preset)
    with pytest.raises(ConfigError, match="model.hf_path"):
        validate_config(cfg, num_devices=8)
    cfg.model.hf_path, cfg.data.path = str(hf_dir), str(data)
    cfg.mesh.num_devices = 8
    validate_config(cfg)


def test_jsonl_data_with_math_reward_and_eval_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(int(a), int(b)) for a, b in rng.integers(0, 50, (40, 2))]
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in rows)
    )
    held_out.write_text(
        "".join(json.dumps({"prompt": f"{b}+{a}=", "answer": str(a + b)}) + "\n" for a, b in rows[:8])
    )
    cfg = micro_config(
        tmp_path / "files",
        **{
            "data.path": str(train),
            "data.eval_path": str(held_out),
            "data.task": "",
            "warmstart.steps": 0,
            "reward.fns": "math_answer,format",
            "reward.weights": "1.0,0.1",
            "steps": 2,
        },
    )
    validate_config(cfg)
    Trainer(cfg).run()
    lines = read_lines(tmp_path / "files" / "metrics.jsonl")
    assert [l["step"] for l in lines if "reward/mean" in l] == [1, 2]
    assert all(
        "reward/math_answer/mean" in l and "reward/format/mean" in l for l in lines if "reward/mean" in l
    )
    evals = [l for l in lines if "eval/accuracy" in l]
    assert [l["step"] for l in evals] == [0, 2] and all(l["eval/num_prompts"] == 8 for l in evals)
