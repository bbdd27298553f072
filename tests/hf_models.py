"""Tiny random Hugging Face Qwen-MoE models built locally for parity tests (no hub access)."""

import json
import os

import numpy as np
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

QWEN3_BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    norm_topk_prob=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

QWEN2_BASE = dict(
    vocab_size=89,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=5,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    norm_topk_prob=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def build_hf_model(kind: str, seed: int = 0, weight_std: float = 0.02, **overrides):
    """A random HF model whose norms and biases are also random, so a dropped one changes the logits."""
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**(QWEN3_BASE | overrides)))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**(QWEN2_BASE | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, weight_std)
    return model.eval()


def save_hf_model(model, path, **save_kwargs) -> str:
    model.save_pretrained(path, **save_kwargs)
    return str(path)


def rewrite_config(path, **changes):
    """Edits config.json in place (e.g. to test the other spelling of a field); None deletes a key."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(file, "w") as f:
        json.dump(cfg, f)


def hf_logits(model, ids: np.ndarray, attention_mask=None, position_ids=None) -> np.ndarray:
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask)
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(position_ids)
    with torch.no_grad():
        return model(torch.as_tensor(ids), **kwargs).logits.float().numpy()
