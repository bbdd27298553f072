"""Run-level checkpointing: exact resume after SIGKILL, corrupt and foreign checkpoints, non-finite stops."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micro_config as micro
from gspo_jax import checkpoint, minibatch, sharding
from gspo_jax.policy import abstract_train_state
from gspo_jax.trainer import Trainer, TrainingStopped
from test_checkpoint import _corrupt, _tree_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
# Wall-clock metrics legitimately differ between runs.
TIMING_KEYS = (
    "tokens_per_s",
    "rollout/tokens_per_s",
    "step_time_s",
    "time/rollout_s",
    "time/reward_s",
    "time/update_s",
)


def _cli(workdir, steps, extra=()):
    return [
        sys.executable,
        "-m",
        "gspo_jax.train",
        "--config=tests/micro_config.py",
        f"--config.workdir={workdir}",
        f"--config.steps={steps}",
        "--config.eval.every=3",
        "--config.checkpoint.async_save=True",
        *extra,
    ]


def _env():
    return os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def _final_state(workdir):
    cfg = micro.get_config()
    mesh = sharding.make_mesh(cfg.mesh)
    target, _ = abstract_train_state(cfg, mesh)
    with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
        state, _, step = ckpt.restore(target, None)
    return state, step


def _wait_for_step(workdir, step, proc, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if os.path.exists(path):
            with open(path) as f:
                if any(
                    json.loads(line).get("step") == step and "reward/mean" in line
                    for line in f
                    if line.strip()
                ):
                    return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never appeared in {path}")


def test_sigkill_and_restart_is_bitwise_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(straight, 6), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        _cli(killed, 6), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_step(killed, 3, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    subprocess.run(_cli(killed, 6), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)

    state_a, step_a = _final_state(straight)
    state_b, step_b = _final_state(killed)
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(state_a["train"]), jax.tree.leaves(state_b["train"])):
        np.testing.assert_array_equal(
            np.atleast_1d(np.asarray(a)).view(np.uint8), np.atleast_1d(np.asarray(b)).view(np.uint8)
        )
    lines_a, lines_b = _metrics(straight), _metrics(killed)
    assert [l["step"] for l in lines_b] == [l["step"] for l in lines_a]  # redone steps logged once
    assert lines_a == lines_b


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A 3-step micro run with a checkpoint per step."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    cfg = micro.override(micro.get_config(), workdir=str(workdir), steps=3, **{"eval.every": 0})
    Trainer(cfg).run()
    return workdir


def test_corrupt_latest_checkpoint_resumes_from_previous(trained_workdir, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    _corrupt(workdir / "checkpoints" / "3", "garbage")
    cfg = micro.override(micro.get_config(), workdir=str(workdir), steps=4, **{"eval.every": 0})
    before = _tree_files(workdir / "checkpoints" / "3")
    with caplog.at_level("WARNING"):
        Trainer(cfg).run()
    assert "step 3" in caplog.text and "falling back" in caplog.text
    steps = [line["step"] for line in _metrics(workdir) if "reward/mean" in line]
    assert steps == [1, 2, 3, 4]  # step 3 was redone from checkpoint 2, logged once
    assert any(name.startswith("3.corrupt-") for name in os.listdir(workdir / "checkpoints"))
    moved = next(n for n in os.listdir(workdir / "checkpoints") if n.startswith("3.corrupt-"))
    assert _tree_files(workdir / "checkpoints" / moved) == before  # kept, not deleted


def test_checkpoint_of_another_model_shape_names_parameters(trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    before = _tree_files(workdir)
    cfg = micro.override(micro.get_config(), workdir=str(workdir), steps=4)
    trainer = Trainer(cfg)
    bigger = trainer.policy.config.replace(moe_intermediate_size=64)
    trainer.policy = trainer.policy.__class__(bigger, *_reshaped_policy(bigger, trainer.mesh))
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        trainer.run()
    # Stacked layers: [layers, experts, hidden, expert width].
    assert "mlp/gate_proj" in str(err.value) and "(2, 8, 128, 128)" in str(err.value)
    assert "(2, 8, 128, 64)" in str(err.value)
    assert _tree_files(workdir) == before


def _reshaped_policy(cfg, mesh):
    from gspo_jax.models.hf import abstract_model
    from gspo_jax.policy import init_params

    graphdef, abstract = abstract_model(cfg)
    return graphdef, init_params(cfg, sharding.param_shardings(abstract, mesh), seed=0)


def test_non_finite_updates_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    real_loss = minibatch.losses.policy_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * jnp.nan, metrics

    monkeypatch.setattr(minibatch.losses, "policy_loss", poisoned)
    cfg = micro.override(
        micro.get_config(),
        workdir=str(tmp_path / "nan"),
        steps=5,
        **{"warmstart.steps": 0, "eval.every": 0, "algo.max_nonfinite_updates": 3},
    )
    trainer = Trainer(cfg)
    initial = jax.tree.map(np.asarray, trainer.policy.params)
    with pytest.raises(TrainingStopped, match="4 non-finite updates in a row at step 2"):
        trainer.run()
    lines = _metrics(tmp_path / "nan")
    assert [line["update_skipped"] for line in lines if "update_skipped" in line] == [1.0, 1.0]
    state, step = _final_state(tmp_path / "nan")
    assert step == 1  # step 2 tripped the stop and was not saved; step 1 (all updates skipped) was
    for a, b in zip(jax.tree.leaves(state["train"].params), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "term"
    proc = subprocess.Popen(
        _cli(workdir, 50), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_step(workdir, 2, proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-2000:]
    logged = [line["step"] for line in _metrics(workdir) if "reward/mean" in line]
    _, step = _final_state(workdir)
    assert step == logged[-1] < 50  # the step in flight finished, was saved, and the run stopped
    assert "rerun the same command to resume" in output
