"""gspo-jax: GSPO reinforcement learning for Mixture-of-Experts language models in JAX/Flax."""

from gspo_jax.logprobs import token_logprobs
from gspo_jax.models.config import PRESETS, ModelConfig
from gspo_jax.models.hf import from_pretrained, save_pretrained
from gspo_jax.models.qwen_moe import QwenMoeForCausalLM

__all__ = [
    "ModelConfig",
    "PRESETS",
    "QwenMoeForCausalLM",
    "from_pretrained",
    "save_pretrained",
    "token_logprobs",
]
