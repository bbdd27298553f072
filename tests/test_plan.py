"""The planner: exact parameter counts, per-device state bytes from shapes and the mesh, and the
prediction beside XLA's own memory analysis of the compiled train step (8 simulated devices)."""

import json
import os
import subprocess
import sys

import micro_config as micro
import pytest

from configs.qwen_moe import get_config
from gspo_jax import plan
from gspo_jax.models import config as model_config
from gspo_jax.policy import model_config as run_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "preset, total, active",
    [
        ("qwen3_30b_a3b", 30_532_122_624, 3_353_032_704),  # shared/QWEN_MOE.md (released models)
        pytest.param("qwen3_235b_a22b", 235_093_634_560, 22_190_763_520, marks=pytest.mark.slow),  # ~1 min
    ],
)
def test_parameter_counts_are_the_released_models(preset, total, active):
    assert plan.parameter_counts(run_model_config(get_config(preset))) == (total, active)


def test_state_bytes_of_the_30b_preset_on_64_chips():
    cfg = get_config("qwen3_30b_a3b")  # fsdp=-1 (8 here) x expert=8
    m = run_model_config(cfg)
    p = plan.plan(cfg, 64)
    assert p["mesh"] == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}
    experts = m.num_hidden_layers * 3 * m.num_experts * m.hidden_size * m.moe_intermediate_size
    norms = m.num_hidden_layers * (2 * m.hidden_size + 2 * m.head_dim) + m.hidden_size
    rest = p["params_total"] - experts - norms  # every other matrix splits its hidden dim over fsdp
    ideal = 4 * (experts / 64 + rest / 8 + norms)
    got = p["bytes_per_device"]
    assert got["params"] == pytest.approx(ideal, rel=1e-6)
    assert got["optimizer"] == pytest.approx(2 * ideal, rel=1e-6)  # AdamW mu + nu, fp32
    assert got["rollout_copy"] == pytest.approx(ideal / 2, rel=1e-6)  # bf16
    layers = ideal - 4 * (2 * m.vocab_size * m.hidden_size / 8 + m.hidden_size)  # less embed, head, norm
    assert got["decode_layers"] == pytest.approx(layers / 2, rel=1e-6)  # CPU: decodes unrolled
    assert plan.plan(cfg, 64, "tpu-v5p")["bytes_per_device"]["decode_layers"] == 0  # scanned decode
    kv = 2 * m.num_hidden_layers * (1024 + 4096) * m.num_key_value_heads * m.head_dim * 2
    assert got["kv_cache"] == pytest.approx(64 * 16 / 64 * kv)  # 1024 rows over 64 batch shards


def test_fsdp_transient_is_one_layer_gathered_not_the_whole_stack():
    """Scanned layers are stacked [L, ...]: the transient is one layer's weights (plus its gradient)
    un-split over fsdp, as the scan gathers a slice per step, not all L layers at once."""
    cfg = get_config("qwen3_30b_a3b")
    m = run_model_config(cfg).replace(vocab_size=64)  # a small vocabulary: a decoder layer is the largest
    mesh = plan._abstract_mesh(cfg, 64)  # fsdp=8 x expert=8
    state = plan.abstract_state(cfg, m, mesh)
    d, heads, kv, hd = m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim
    attention = d * (heads + 2 * kv) * hd + heads * hd * d + 2 * hd  # q, k, v, o and the q/k norms
    experts = 3 * (m.num_experts // 8) * d * m.moe_intermediate_size  # this device's experts, D whole
    layer = attention + d * m.num_experts + experts + 2 * d  # + router and the two layer norms
    assert plan.fsdp_transient_bytes(state.params) == pytest.approx(2 * 4 * layer, rel=1e-6)


@pytest.mark.parametrize("factor", [0.0, 1.25])
def test_expert_parallel_buffers_of_the_30b_preset(factor):
    """moe_bytes on 8 x 8 chips (expert=8) against the all-to-all blocks written out by hand."""
    cfg = get_config("qwen3_30b_a3b")
    cfg.model.capacity_factor = factor
    m = run_model_config(cfg)
    d, i, k, c = 2048, 768, 8, 2  # hidden, expert width, top-k, bf16
    tokens = 4 * 5119  # 1024 rows / 4 minibatches / 64 shards, 1024 + 4096 - 1 positions
    if factor:  # each of a device's 16 experts gets ceil(1.25 * tokens * 8 / 128) slots per sender
        received = 8 * 16 * -(-(5 * tokens * k) // (4 * 128))
    else:  # a token's 8 choices can all land on one device's 16 experts
        received = 8 * tokens * 8
    exchange = 4 * received * d * c + 2 * tokens * k * d * c  # send, receive, outputs there and back
    experts = received * (2 * d + 3 * i) * c  # ragged over the received rows (top-1)
    mesh = plan._abstract_mesh(cfg, 64)
    assert plan.moe_bytes(m, mesh, tokens, "tpu") == exchange + experts


@pytest.fixture
def wide_preset():
    """A small model whose expert weights dominate its memory, as in the real MoE presets."""
    model_config.PRESETS["wide"] = model_config.PRESETS["tiny"].replace(
        num_experts=16, hidden_size=256, moe_intermediate_size=512
    )
    yield "wide"
    del model_config.PRESETS["wide"]


@pytest.mark.parametrize(
    "mesh",
    [
        {"mesh.fsdp": 2, "mesh.expert": 4},
        {"mesh.fsdp": 8},
        {"mesh.fsdp": 2, "mesh.expert": 4, "algo.minibatches": 1, "algo.grad_accumulation": 2},
    ],
)
def test_prediction_beside_xla_memory_analysis(wide_preset, mesh):
    """Explicit expert parallelism (its all-to-all buffers), FSDP (gathered weights, full-size
    gradients before the reduce-scatter) and gradient accumulation (a micro-batch's activations, an
    fp32 accumulator); ragged is the accelerator path, compiled here on CPU."""
    cfg = micro.override(
        micro.get_config(),
        **{"mesh.num_devices": 8, "mesh.data": 1, "mesh.fsdp": 1, "mesh.expert": 1, **mesh},
        **{
            "model.preset": wide_preset,
            "model.moe_dispatch": "ragged",
            "model.scan_unroll": 1,  # the planner models one scanned layer at a time, as real presets run
            "rollout.prompts_per_step": 8,
            "rollout.group_size": 2,
            "data.max_prompt_len": 16,
        },
    )
    predicted = plan.plan(cfg, 8)["bytes_per_device"]
    xla = plan.compiled_memory(cfg)
    # The compiled step's arguments are the train state (plus a few kB of batch).
    assert xla["arguments"] == pytest.approx(predicted["params"] + predicted["optimizer"], rel=0.15)
    assert xla["peak"] == pytest.approx(predicted["train_peak"], rel=0.15)


def test_cli_prints_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    env = os.environ | {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gspo_jax.plan",
            "--config=configs/qwen_moe.py",
            "--num_devices=8",
            "--config.mesh.expert=2",
            "--accelerator=h100",
            f"--json={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "per device" in proc.stdout and "fits" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mesh"] == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
    layer = 128 * (4 + 2 + 2 + 4) * 32 + 2 * 128 + 2 * 32 + 128 * 8 + 3 * 8 * 128 * 128
    assert result["fits"] is True and result["params_total"] == 2 * layer + 2 * 64 * 128 + 128  # tiny


def test_a_plan_that_does_not_fit_suggests_the_least_accumulation_that_does():
    """30B on 64 v6e chips (32 GiB) does not fit with whole-minibatch updates; the suggestion keeps the
    64 chips, accumulates gradients, fits when planned, and no mesh fits with half its accumulation."""
    cfg = get_config("qwen3_30b_a3b")
    p = plan.plan(cfg, 64, "tpu-v6e")
    assert not p["fits"]
    s = p["suggestion"]
    assert s["num_devices"] == 64 and s["grad_accumulation"] > 1
    assert "--config.algo.grad_accumulation=" in plan.format_plan(p)

    def planned(axes, accumulation):
        trial = cfg.copy_and_resolve_references()
        trial.mesh.update(axes)
        trial.algo.grad_accumulation = accumulation
        return plan.plan(trial, 64, "tpu-v6e")

    suggested = planned(s["mesh"], s["grad_accumulation"])
    assert suggested["fits"] and suggested["bytes_per_device"]["peak"] == s["peak_bytes"]
    for axes in plan._candidate_meshes(64):
        try:
            assert not planned(axes, s["grad_accumulation"] // 2)["fits"], axes
        except ValueError:  # a mesh that cannot split the model
            continue
