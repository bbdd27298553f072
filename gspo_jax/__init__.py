"""gspo-jax: GSPO reinforcement learning for Mixture-of-Experts language models in JAX/Flax."""
