"""Sequence packing for the policy update: several rollout sequences share one training row.

A rollout row is [left-padded prompt (P) | completion (C)], and a batch's rows are often half padding.
The update's forward runs over the packed rows instead: each sequence's real input tokens (those the
unpacked forward over the row's first T - 1 columns sees, `input_lengths`) are copied end to end into
rows of width W = P + C - 1, with positions restarting at 0 and a segment id per sequence that keeps
attention inside it. The hidden states that predict completion tokens are gathered back to
[sequences, C], so log-probs and losses see the same [B, C] arrays as without packing.

The host plans (numpy, `plan_packing`): it knows every sequence's length once the rollout is scored.
Per pass over the batch it shuffles each batch shard's sequences, splits them into the minibatches,
and packs each minibatch's sequences of a shard first-fit decreasing into that shard's rows. Plans
stay inside a shard so that every gather on the device is local to it (no collective moves tokens or
hidden states). The row count is one bucket for the whole step (`row_buckets`), so a step compiles
once per (completion width, row bucket); the trainer never lowers a width's row count during a run
(RLStep), so after a few steps every step reuses a compiled update. A plan that removes less than
MIN_ROW_SAVING of the rows is not used (`saves_rows`).

The device side (`gather_sequences`, `forward_inputs`, `packed_replay_ids`, `gather_hidden`,
`scatter_sequences`) runs inside the jitted update and scoring.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedRows:
    """One step's packing plan, leading dims [I passes, M minibatches, S batch shards]:

    sequences:    [I, M, S, n] int32, the shard-local rows (of B / S) of each minibatch's sequences;
    row_seq:      [I, M, S, R, W] int32, which of the minibatch's n sequences fills each packed slot;
    row_t:        [I, M, S, R, W] int32, the slot's column in that sequence's [P + C] rollout row;
    positions:    [I, M, S, R, W] int32, position within the sequence (0 at its first real token);
    segments:     [I, M, S, R, W] int32, 1 + the sequence's index in its packed row, 0 on padding;
    hidden_index: [I, M, S, n, C] int32, flat index into the shard's R * W packed slots of the hidden
                  state that predicts each completion token (0 past the completion's end).
    Padding slots read column 0 of the minibatch's first sequence and are masked by segment 0.
    """

    sequences: np.ndarray
    row_seq: np.ndarray
    row_t: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    hidden_index: np.ndarray

    @property
    def rows(self) -> int:
        return self.row_seq.shape[-2]


ROW_BUCKETS = 16  # packed row counts a step may use per max_rows: multiples of ceil(max_rows / 16)


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """Packed row counts a step may use: multiples of ceil(max_rows / ROW_BUCKETS) below max_rows, and
    max_rows (the unpacked row count, which always suffices). Fine steps waste few rows; the trainer
    keeps compilations rare by never lowering the count during a run."""
    step = -(-max_rows // ROW_BUCKETS)
    return (*range(step, max_rows, step), max_rows)


def first_fit_decreasing(lengths, width: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose lengths sum to at most `width` (each <= width):
    longest first, each into the first row with room."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def input_lengths(prompt_lens, completion_lens, completion_width: int) -> np.ndarray:
    """Real input tokens per sequence: those of the rollout row's columns [0, T - 1), the inputs of
    the unpacked forward (a completion that fills all C columns loses its last token, which predicts
    nothing; a shorter one keeps it, so router statistics and the load-balancing loss count the same
    tokens packed or not)."""
    clipped = np.minimum(np.asarray(completion_lens), completion_width - 1)
    return np.maximum(np.asarray(prompt_lens) + clipped, 1).astype(np.int64)


def assign_rows(lengths, *, width: int, shards: int, minibatches: int, passes: int, rng) -> list:
    """[pass][minibatch][shard] -> (sequences, rows): sequences the shard-local ids of the minibatch
    (a random split of the shard's rows per pass; rng None: in row order), rows the first-fit-decreasing
    packing of their input `lengths` (lists of positions in `sequences`)."""
    per_shard = len(lengths) // shards
    per_minibatch = per_shard // minibatches
    plan = []
    for _ in range(passes):
        orders = [np.arange(per_shard) if rng is None else rng.permutation(per_shard) for _ in range(shards)]
        minibatch_plans = []
        for m in range(minibatches):
            shard_plans = []
            for s, order in enumerate(orders):
                sequences = order[m * per_minibatch : (m + 1) * per_minibatch]
                member_lengths = [int(lengths[s * per_shard + i]) for i in sequences]
                shard_plans.append((sequences, first_fit_decreasing(member_lengths, width)))
            minibatch_plans.append(shard_plans)
        plan.append(minibatch_plans)
    return plan


def rows_needed(assignment) -> int:
    """The most packed rows any (pass, minibatch, shard) of an assignment uses."""
    return max(len(rows) for minibatches in assignment for shards in minibatches for _, rows in shards)


def materialize(
    assignment, lengths, prompt_lens, completion_lens, *, prompt_width: int, completion_width: int, rows: int
):
    """The PackedRows arrays of an assignment of sequences with input `lengths`, `rows` packed rows per
    (pass, minibatch, shard)."""
    passes, minibatches, shards = len(assignment), len(assignment[0]), len(assignment[0][0])
    n = len(assignment[0][0][0][0])
    per_shard = len(prompt_lens) // shards
    width = prompt_width + completion_width - 1
    shape = (passes, minibatches, shards)
    out = PackedRows(
        sequences=np.zeros((*shape, n), np.int32),
        row_seq=np.zeros((*shape, rows, width), np.int32),
        row_t=np.zeros((*shape, rows, width), np.int32),
        positions=np.zeros((*shape, rows, width), np.int32),
        segments=np.zeros((*shape, rows, width), np.int32),
        hidden_index=np.zeros((*shape, n, completion_width), np.int32),
    )
    for i, m, s in np.ndindex(*shape):
        sequences, packed = assignment[i][m][s]
        out.sequences[i, m, s] = sequences
        for r, members in enumerate(packed):
            start = 0
            for segment, j in enumerate(members, start=1):
                b = s * per_shard + int(sequences[j])
                length, plen = int(lengths[b]), int(prompt_lens[b])
                span = slice(start, start + length)
                out.row_seq[i, m, s, r, span] = j
                out.row_t[i, m, s, r, span] = np.arange(length) + prompt_width - plen
                out.positions[i, m, s, r, span] = np.arange(length)
                out.segments[i, m, s, r, span] = segment
                # Completion token c is predicted by the input at rollout column P - 1 + c, which
                # sits plen - 1 + c slots into the sequence's span.
                clen = min(int(completion_lens[b]), completion_width)
                out.hidden_index[i, m, s, j, :clen] = r * width + start + plen - 1 + np.arange(clen)
                start += length
    return out


def plan_packing(
    prompt_lens,
    completion_lens,
    *,
    prompt_width: int,
    completion_width: int,
    shards: int,
    minibatches: int,
    passes: int,
    rng,
    min_rows: int = 1,
    sync_rows=lambda rows: rows,
) -> PackedRows:
    """The packing of one step's B sequences (this process's rows, in order; `shards` of them equal
    blocks), with the smallest bucket of packed rows (per pass, minibatch and shard) that holds every
    shard's packing and at least `min_rows`. sync_rows maps this process's row count to the job's
    (sharding.max_over_hosts in a multi-process job, so that every process builds the same shape)."""
    prompt_lens, completion_lens = np.asarray(prompt_lens), np.asarray(completion_lens)
    if len(prompt_lens) % (shards * minibatches):
        raise ValueError(
            f"{len(prompt_lens)} sequences do not split into {shards} shards x {minibatches} minibatches"
        )
    lengths = input_lengths(prompt_lens, completion_lens, completion_width)
    assignment = assign_rows(
        lengths,
        width=prompt_width + completion_width - 1,
        shards=shards,
        minibatches=minibatches,
        passes=passes,
        rng=rng,
    )
    needed = max(sync_rows(rows_needed(assignment)), min_rows)
    rows = bucket_rows(needed, len(prompt_lens) // (shards * minibatches))
    return materialize(
        assignment,
        lengths,
        prompt_lens,
        completion_lens,
        prompt_width=prompt_width,
        completion_width=completion_width,
        rows=rows,
    )


MIN_ROW_SAVING = 1 / 8  # pack only when it removes at least this fraction of the rows


def saves_rows(plan: PackedRows) -> bool:
    """Whether the plan's packed rows are at most (1 - MIN_ROW_SAVING) of the unpacked rows: below
    that the packed forward's gathers and segment masks cost about what the removed padding saved
    (measured: the small bench's rows of up to 32 new tokens pack hardly at all)."""
    return plan.rows <= (1 - MIN_ROW_SAVING) * plan.sequences.shape[-1]


def bucket_rows(needed: int, max_rows: int) -> int:
    """The smallest row bucket (row_buckets(max_rows)) that holds `needed` rows."""
    return next(c for c in row_buckets(max_rows) if c >= needed)


# Device side: jnp, inside the jitted update. S (batch shards) is the leading dim of every plan array
# below; vmapping the gathers over it keeps each one inside its shard.


def gather_sequences(x_b, sequences_sn):
    """[B, ...] per-sequence array -> [S * n, ...]: each shard's minibatch rows, shard-major."""
    shards, n = sequences_sn.shape
    x_s = x_b.reshape(shards, x_b.shape[0] // shards, *x_b.shape[1:])
    taken = jax.vmap(lambda x, idx: x[idx])(x_s, sequences_sn)
    return taken.reshape(shards * n, *x_b.shape[1:])


def scatter_sequences(values_mnx, sequences_msn, num_rows: int):
    """The inverse of gather_sequences over all M minibatches of a pass: [M, S * n, ...] per-minibatch
    values -> [B, ...] in row order (each shard's rows filled from its own minibatch members)."""
    m, shards, n = sequences_msn.shape
    values = values_mnx.reshape(m, shards, n, *values_mnx.shape[2:]).swapaxes(0, 1)
    values = values.reshape(shards, m * n, *values_mnx.shape[2:])
    rows = sequences_msn.swapaxes(0, 1).reshape(shards, m * n)
    zeros = jnp.zeros((shards, num_rows // shards, *values_mnx.shape[2:]), values_mnx.dtype)
    placed = jax.vmap(lambda z, idx, v: z.at[idx].set(v, unique_indices=True))(zeros, rows, values)
    return placed.reshape(num_rows, *values_mnx.shape[2:])


def packed_tokens(x_nt, row_seq_srw, row_t_srw):
    """[S * n, T, ...] minibatch rows -> [S * R, W, ...] packed rows (slots per row_seq / row_t)."""
    shards, rows, width = row_seq_srw.shape
    x_s = x_nt.reshape(shards, x_nt.shape[0] // shards, *x_nt.shape[1:])
    taken = jax.vmap(lambda x, seq, t: x[seq, t])(x_s, row_seq_srw, row_t_srw)
    return taken.reshape(shards * rows, width, *x_nt.shape[2:])


def _flat_rows(x_srw):
    return x_srw.reshape(-1, x_srw.shape[-1])


def valid_slots(rows: PackedRows):
    """[S * R, W] bool: the packed slots that hold a token of one minibatch ([S, ...] leaves)."""
    return _flat_rows(rows.segments) > 0


def forward_inputs(tokens_nt, rows: PackedRows):
    """model.forward's inputs for one minibatch packed by `rows` ([S, ...] leaves) from its rollout
    rows tokens_nt [S * n, T]: (ids [S * R, W], keyword arguments valid_bt, positions_bt, segments_bt)."""
    ids = packed_tokens(tokens_nt, rows.row_seq, rows.row_t)
    inputs = {"valid_bt": valid_slots(rows), "positions_bt": _flat_rows(rows.positions)}
    return ids, inputs | {"segments_bt": _flat_rows(rows.segments)}


def packed_replay_ids(ids_nltk, row_seq_srw, row_t_srw):
    """Routing-replay ids [S * n, L_moe, T - 1, k] -> [L_moe, S * R, W, k] in the packed layout.
    Packed slots never hold a sequence's last column (T - 1), so every row_t is in range."""
    ids_ntlk = jnp.swapaxes(ids_nltk, 1, 2)
    return jnp.moveaxis(packed_tokens(ids_ntlk, row_seq_srw, row_t_srw), 2, 0)


def gather_hidden(hidden_rwd, hidden_index_snc):
    """[S * R, W, D] packed hidden states -> [S * n, C, D] at each completion token's predictor."""
    shards, n, width_c = hidden_index_snc.shape
    rows, width, dim = hidden_rwd.shape
    flat = hidden_rwd.reshape(shards, rows // shards * width, dim)
    taken = jax.vmap(lambda h, idx: h[idx])(flat, hidden_index_snc)
    return taken.reshape(shards * n, width_c, dim)
