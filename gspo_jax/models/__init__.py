"""Qwen-style MoE model: config, layers, MoE dispatch, causal LM and HF conversion."""
