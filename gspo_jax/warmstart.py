"""Supervised warm start: a few cross-entropy steps on a task's (prompt, answer) pairs before RL.

The GSPO paper starts RL from a cold-start fine-tuned model; a random tiny policy almost never produces
a correct answer, so every group's rewards are equal and GSPO has no signal. Examples use the rollout
layout [left-padded prompt | target + EOS, right-padded] so the loss reuses the trainer's log-prob code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gspo_jax.logprobs import completion_logprobs
from gspo_jax.optim import init_state
from gspo_jax.sharding import shardings_of


@dataclasses.dataclass(frozen=True)
class SupervisedSet:
    """tokens/valid: [M, P + N]; target_mask: [M, N] (1 on target tokens and the final EOS)."""

    tokens: np.ndarray
    valid: np.ndarray
    target_mask: np.ndarray


def build_supervised_set(
    pairs: list[tuple[str, str]],
    encode_prompts: Callable[[list[str]], list[list[int]]],
    tokenizer,
    eos_id: int,
    pad_id: int,
) -> SupervisedSet:
    """encode_prompts: the RL pipeline's prompt encoding (`data.prompt_encoder`), so the supervised
    prompts are token for token the prompts RL samples from (chat template and bos included)."""
    prompts = encode_prompts([p for p, _ in pairs])
    targets = [tokenizer.encode(t, add_special_tokens=False) + [eos_id] for _, t in pairs]
    p_len, t_len = max(map(len, prompts)), max(map(len, targets))
    m = len(pairs)
    tokens = np.full((m, p_len + t_len), pad_id, np.int32)
    valid = np.zeros((m, p_len + t_len), bool)
    target_mask = np.zeros((m, t_len), np.float32)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        tokens[i, p_len - len(p) : p_len] = p
        tokens[i, p_len : p_len + len(t)] = t
        valid[i, p_len - len(p) : p_len + len(t)] = True
        target_mask[i, : len(t)] = 1.0
    return SupervisedSet(tokens, valid, target_mask)


def make_sft_step(
    graphdef, optimizer: optax.GradientTransformation, logprob_chunk: int, carry_shardings=None
) -> Callable:
    """jit((params, opt_state), tokens, valid, target_mask) -> ((params, opt_state), loss): token-mean NLL.

    carry_shardings pins the new carry to the old one's layout (donated buffers reused, no recompile)."""

    def loss_fn(params, tokens, valid, target_mask):
        model = nnx.merge(graphdef, params)
        logp, _, _ = completion_logprobs(
            model, tokens, valid, target_mask.shape[1], temperature=1.0, chunk=logprob_chunk
        )
        return -jnp.sum(logp * target_mask) / jnp.maximum(jnp.sum(target_mask), 1.0)

    def step(carry, tokens, valid, target_mask):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, valid, target_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    out_shardings = None if carry_shardings is None else (carry_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def run_warmstart(
    params,
    graphdef,
    data: SupervisedSet,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    logprob_chunk: int,
    place: Callable,
    on_eval: Callable[[int, nnx.State], None],
    eval_every: int,
    on_step: Callable[[int, float], None],
):
    """Runs `steps` AdamW updates on random batches of `data`; returns the new params.

    place: puts a host batch on the mesh; on_eval(step, params) is called every `eval_every` steps;
    on_step(step, loss) after each update.
    """
    optimizer = optax.adamw(lr)
    carry = (params, init_state(optimizer, params))
    step_fn = make_sft_step(graphdef, optimizer, logprob_chunk, shardings_of(carry))
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        rows = rng.choice(len(data.tokens), size=batch_size, replace=len(data.tokens) < batch_size)
        carry, loss = step_fn(
            carry, place(data.tokens[rows]), place(data.valid[rows]), place(data.target_mask[rows])
        )
        on_step(step, float(loss))
        if eval_every and step % eval_every == 0:
            on_eval(step, carry[0])
    return carry[0]
