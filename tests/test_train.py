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
    assert 0 <= line["logprob_gap/seq_abs"] <= line["logprob_gap/token_abs"]
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
            "rollout.compact_rows": "yes",
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
        "--config.rollout.compact_rows: must be one of ('auto', 'on', 'off')",
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
        env=os.environ
        | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"},
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


def _restored_params(workdir, cfg, step):
    from gspo_jax import checkpoint, sharding
    from gspo_jax.policy import abstract_train_state

    target, _ = abstract_train_state(cfg, sharding.make_mesh(cfg.mesh))
    with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
        tree, _, _ = ckpt.read(target, step)
    return tree


def test_reference_kl_and_grpo_level_run(tmp_path):
    """The KL reference is the policy RL starts from: after the warm start, and the same after a resume."""
    workdir = tmp_path / "kl"
    settings = {
        "algo.beta": 0.05,
        "algo.importance_sampling_level": "token",
        "algo.minibatches": 1,  # one update per step: the first update is on-policy
        "warmstart.steps": 4,
        "warmstart.eval_every": 0,
        "eval.every": 0,
    }
    cfg = micro_config(workdir, steps=1, **settings)
    validate_config(cfg)
    trainer = Trainer(cfg)
    assert trainer.rl.settings.level == "token"
    trainer.run()
    line = read_lines(workdir / "metrics.jsonl")[-1]
    # On-policy: pi_theta == pi_ref exactly when the reference is the post-warm-start policy (k3 = 0);
    # a reference left at the random initialisation gave kl_ref ~1 here.
    assert line["step"] == 1 and abs(line["kl_ref"]) < 1e-6, line["kl_ref"]
    rl_start = _restored_params(workdir, cfg, 0)
    for a, b in zip(jax.tree.leaves(rl_start["ref"]), jax.tree.leaves(rl_start["train"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    resumed_cfg = micro_config(workdir, steps=2, **settings)
    resumed = Trainer(resumed_cfg)
    resumed.run()
    for a, b in zip(jax.tree.leaves(resumed.ref_params), jax.tree.leaves(rl_start["train"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    line = read_lines(workdir / "metrics.jsonl")[-1]
    assert line["step"] == 2 and line["kl_ref"] > 1e-6  # the policy moved away from the reference


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


def _tiny_parameter_counts():
    """(total, active) of the tiny preset from its dimensions (shared/QWEN_MOE.md layout)."""
    d, vocab, layers, heads, kv, hd, experts, k, width = 128, 64, 2, 4, 2, 32, 8, 2, 128
    attention = d * heads * hd * 2 + d * kv * hd * 2 + 2 * hd
    per_layer_dense = 2 * d + attention + d * experts
    expert = 3 * d * width
    total = 2 * vocab * d + d + layers * (per_layer_dense + experts * expert)
    return total, total - layers * (experts - k) * expert


def test_python_api_console_samples_and_held_out_split(tmp_path, capsys):
    """gspo_jax.train.run on a JSONL file without an eval file: a held-out split, the console, samples."""
    from gspo_jax.data import eval_batches, make_prompt_dataset
    from gspo_jax.tokenizer import builtin_tokenizer
    from gspo_jax.train import run

    rows = [(a, b) for a in range(8) for b in range(5)]  # 40 distinct prompts
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in rows)
    )
    settings = {
        "data.path": str(train),
        "data.task": "",
        "warmstart.steps": 0,
        "reward.fns": "math_answer,format",
        "reward.weights": "1.0,0.1",
        "log.samples_every": 5,  # not a divisor of steps: the last step writes samples anyway
        "log.num_samples": 3,
        "log.console_every": 10,
    }
    cfg = micro_config(tmp_path / "api", **settings)
    final = run(cfg)
    out = capsys.readouterr().out
    lines = read_lines(tmp_path / "api" / "metrics.jsonl")
    assert final["reward/mean"] == lines[-1]["reward/mean"] and final["eval/num_prompts"] == 4

    # 40 records: min(data.eval_size=8, 10%) = 4 held out, disjoint from the 36 trained on.
    assert "records: 36 train, 4 eval (held out of data.path" in out
    tokenizer = builtin_tokenizer()
    dataset = make_prompt_dataset(cfg.data, tokenizer, prompts_per_step=4, seed=0, hold_out=True)
    trained = {p for _ in range(dataset.steps_per_epoch) for p in next(dataset).prompts}
    held = {p for b in eval_batches(cfg.data, tokenizer, batch_size=8, hold_out=True) for p in b.prompts}
    assert len(trained) == 36 and len(held) == 4 and not trained & held
    assert [l["eval/num_prompts"] for l in lines if "eval/accuracy" in l] == [4, 4]

    total, active = _tiny_parameter_counts()
    assert "devices: 1 x cpu in 1 process(es); mesh {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}" in out
    assert f"policy: {total:,} parameters, {active:,} active per token" in out
    assert "compiling the sampler, scoring and update steps" in out
    first = next(l for l in out.splitlines() if l.startswith("step 1/2"))
    assert "first step (includes compilation)" in first

    samples = read_lines(tmp_path / "api" / "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2, 2]
    for s in samples:
        a, b = s["prompt"].rstrip("=").split("+")
        assert s["answer"] == str(int(a) + int(b))
        assert s["reward"] == pytest.approx(s["rewards/math_answer"] + 0.1 * s["rewards/format"])
        assert isinstance(s["completion"], str)

    # Rerunning at the end says so; a changed key is listed with its old and new value.
    run(micro_config(tmp_path / "api", **settings, **{"optim.lr": 2e-4}))
    out = capsys.readouterr().out
    assert "config changed since step 2 (old -> new): optim.lr: 0.0001 -> 0.0002" in out
    assert "already at step 2 of 2: nothing to do" in out


def test_keep_best_by_must_name_a_logged_metric_with_a_direction(tmp_path):
    from gspo_jax import checkpoint

    cfg = micro_config(tmp_path / "kb", **{"checkpoint.keep_best_by": "eval/acc"})
    with pytest.raises(
        ConfigError, match=r"keep_best_by: 'eval/acc' is not a metric this run logs.*eval/accuracy"
    ):
        validate_config(cfg)
    cfg = micro_config(tmp_path / "kb", **{"checkpoint.keep_best_by": "eval/accuracy", "eval.every": 0})
    with pytest.raises(ConfigError, match=r"evaluation is off"):
        validate_config(cfg)
    cfg = micro_config(tmp_path / "kb", **{"checkpoint.keep_best_mode": "largest"})
    with pytest.raises(ConfigError, match=r"keep_best_mode: 'largest'"):
        validate_config(cfg)
    for metric, mode in (("eval/accuracy", "max"), ("loss", "min"), ("reward/sort_digits/mean", "max")):
        cfg = micro_config(tmp_path / "kb", **{"checkpoint.keep_best_by": metric})
        validate_config(cfg)
        assert checkpoint.best_mode(cfg) == mode
    cfg.checkpoint.keep_best_mode = "min"
    assert checkpoint.best_mode(cfg) == "min"


def test_config_key_typo_prints_one_line_with_the_suggestion(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gspo_jax.train",
            "--config=tests/micro_config.py",
            "--config.algo.minibatchs=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip() == "error: unknown key --config.algo.minibatchs; did you mean algo.minibatches?"
    )


def test_data_section_is_validated(tmp_path):
    cfg = micro_config(tmp_path / "d", **{"data.task": "", "data.path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match=r"--config.data.path: no file matches"):
        validate_config(cfg)
    cfg = micro_config(tmp_path / "d", **{"data.overlong": "cut"})
    with pytest.raises(ConfigError, match=r"--config.data: data.overlong must be one of"):
        validate_config(cfg)
    cfg = micro_config(tmp_path / "d", **{"data.task": "sorting"})
    with pytest.raises(ConfigError, match=r"--config.data.task: 'sorting'"):
        validate_config(cfg)
