"""The train state on a pod-style mesh (8 simulated devices, fsdp=2 x expert=4, a 16-expert model):
per-device bytes against the ideal computed from shapes and the mesh, and every jitted phase that
takes the state handing it back in the layout it came in (donation reuses buffers, no recompiles)."""

import logging

import jax
import jax.numpy as jnp
import micro_config as micro
import optax
import pytest

from gspo_jax import plan, sharding
from gspo_jax.models import config as model_config
from gspo_jax.optim import init_state
from gspo_jax.policy import abstract_train_state
from gspo_jax.trainer import Trainer
from gspo_jax.warmstart import make_sft_step

MESH = {"mesh.num_devices": 8, "mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 4, "mesh.tensor": 1}
FSDP, EXPERT = 2, 4


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    saved = dict(model_config.PRESETS)
    # The tiny architecture widened so expert weights dominate, as in a real MoE.
    model_config.PRESETS["tiny16"] = model_config.PRESETS["tiny"].replace(
        num_experts=16, hidden_size=256, moe_intermediate_size=256
    )
    yield micro.override(
        micro.get_config(),
        **MESH,
        **{
            "model.preset": "tiny16",
            "workdir": str(tmp_path_factory.mktemp("state")),
            "rollout.prompts_per_step": 8,
            "warmstart.steps": 0,
        },
    )
    model_config.PRESETS.clear()
    model_config.PRESETS.update(saved)


@pytest.fixture(scope="module")
def trainer(cfg):
    return Trainer(cfg)


def ideal_param_bytes_per_device(m) -> int:
    """fp32 parameters with experts split over expert x fsdp (on embed), other matrices over fsdp on
    their embed dimension, norms replicated."""
    d, hd = m.hidden_size, m.head_dim
    experts = 3 * m.num_experts * d * m.moe_intermediate_size / (EXPERT * FSDP)
    router = d * m.num_experts / FSDP
    attention = (2 * d * m.num_attention_heads * hd + 2 * d * m.num_key_value_heads * hd) / FSDP
    norms = 2 * d + 2 * hd
    per_layer = experts + router + attention + norms
    return 4 * (m.num_hidden_layers * per_layer + 2 * m.vocab_size * d / FSDP + d)


def bytes_on(device, tree) -> int:
    return sum(
        s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device
    )


def test_train_state_bytes_per_device_are_the_ideal(trainer):
    state = trainer.initial_state()
    ideal = ideal_param_bytes_per_device(trainer.policy.config)
    for device in (jax.devices()[0], jax.devices()[7]):
        assert bytes_on(device, state.params) == pytest.approx(ideal, rel=0.05)
        # AdamW keeps two fp32 moments per parameter; the optimizer once put them all on every device
        # (52 MB here instead of 7.3 MB).
        assert bytes_on(device, state.opt_state) == pytest.approx(2 * ideal, rel=0.05)
    assert state.step.sharding.is_fully_replicated
    counters = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert counters and all(x.sharding.is_fully_replicated for x in counters)


def test_abstract_train_state_matches_the_created_one(cfg, trainer):
    target, _ = abstract_train_state(cfg, trainer.mesh)
    real = trainer.initial_state()
    assert jax.tree.structure(target["train"]) == jax.tree.structure(real)
    for abstract, array in zip(jax.tree.leaves(target["train"]), jax.tree.leaves(real)):
        assert (abstract.shape, abstract.dtype) == (array.shape, array.dtype)
        assert abstract.sharding == array.sharding


def test_compiled_phases_return_the_state_in_its_input_shardings(trainer):
    state = trainer.initial_state()
    batch = plan.abstract_rollout_batch(trainer.mesh, rows=32, prompt_len=8, width=8)
    compiled = trainer.rl.train_fn.lower(state, batch, jax.random.key(0)).compile()
    state_in = jax.tree.leaves(compiled.input_shardings[0][0])
    state_out = jax.tree.leaves(compiled.output_shardings[0])
    assert len(state_in) == len(jax.tree.leaves(state)) == len(state_out)
    changed = [(a, b) for a, b in zip(state_in, state_out) if a != b]
    assert not changed, changed
    assert state_in == jax.tree.leaves(sharding.shardings_of(state))

    cast = trainer.rl.cast_for_rollout.lower(state.params).compile()
    assert jax.tree.leaves(cast.output_shardings) == jax.tree.leaves(sharding.shardings_of(state.params))

    # The warm start's own AdamW carry.
    optimizer = optax.adamw(1e-3)
    carry = (state.params, init_state(optimizer, state.params))
    step = make_sft_step(trainer.policy.graphdef, optimizer, 256, sharding.shardings_of(carry))
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=sharding.batch_sharding(trainer.mesh, 2))
    mask = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding.batch_sharding(trainer.mesh, 2))
    valid = jax.ShapeDtypeStruct((8, 16), jnp.bool_, sharding=sharding.batch_sharding(trainer.mesh, 2))
    compiled = step.lower(carry, tokens, valid, mask).compile()
    assert jax.tree.leaves(compiled.output_shardings[0]) == jax.tree.leaves(sharding.shardings_of(carry))


@pytest.mark.slow
def test_a_sharded_run_with_warm_start_compiles_each_phase_once(cfg, caplog):
    cfg = micro.override(
        cfg.copy_and_resolve_references(),
        **{"warmstart.steps": 2, "warmstart.eval_every": 0, "eval.every": 0, "checkpoint.every": 100},
    )
    cfg.workdir += "/run"
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        Trainer(cfg).run()
    compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    # Warm-start outputs once came back in XLA's own layout, so step 2 of each phase recompiled.
    for phase in ("jit(step)", "jit(score)", "jit(train)"):
        assert sum(phase in m for m in compiled) == 1, (phase, compiled)
