"""Grouped routed LoRA on CPU, where XLA has no grouped GEMM (the ``sorted`` and ``chunked_gather``
backends of `phatgoose_jax.routing.routed_lora`).

Letters used in shape comments:
  T tokens, D site input, F site output, E experts, K top-k, R LoRA rank, N = T*K token-expert
  assignments, G padded blocks, S rows per block, C slots per expert (capacity), Tc tokens per
  chunk, Nc assignments per chunk.

Every function here is exact (equal to the oracle loop over experts, forward and backward) and
takes per-assignment coefficients ``coef`` [T, K] (routing weight times expert scale) in the
compute dtype:

  * `_grouped_capacity`: static [E, C] slot grid, two batched matmuls against the stacked
    A [E, D, R] / B [E, R, F]; valid while no expert has more than C rows;
  * `_grouped_blocked`: each expert's rows padded to a multiple of S, one weight gather per
    S-row block, G <= ceil(N/S) + min(E, N) blocks;
  * `_chunked_gather_coef`: assignments sorted by expert, chunks of Nc rows, each gathering its
    rows' A/B; cost ~N whatever E or the routing;
  * `_chunked_capacity`: tokens in chunks of Tc (``lax.map``), each chunk on the capacity grid
    or, through ``lax.cond`` when an expert overflows, on the fallback `sorted_fallback` picks.

The sizes (capacity, block rows, chunk tokens, gather chunk) are the measured choices documented
on each helper and in docs/benchmarks.md.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Capacity of the CPU 'sorted' fast path, as a multiple of the mean rows per expert N/E.
DEFAULT_CAPACITY_FACTOR = 1.5
# CPU 'sorted': overflow fallback 'blocked' up to this many experts, else 'chunked_gather'.
_BLOCKED_FALLBACK_MAX_EXPERTS = 64
# Byte budget of one [E*C, max(D, F)] float32 grid in the chunked CPU 'sorted' path.
_CHUNK_BYTES = 16 << 20
# The same budget when `phatgoose_jax.cpu_malloc` keeps buffers on the heap (no page faults).
_CHUNK_BYTES_HEAP = 48 << 20
# Per-expert-overhead floor of the CPU 'sorted' token chunk: >= this many assignments per
# expert, up to this many tokens (see sorted_chunk_tokens).
_CHUNK_ROWS_PER_EXPERT = 16
_CHUNK_MAX_TOKENS_FOR_EXPERTS = 1024
# Byte budget of the weights one 'chunked_gather' chunk gathers ([Nc, D, R] + [Nc, R, F]).
_GATHER_CHUNK_BYTES = 12 << 20


def sorted_block_rows(num_assignments: int, num_experts: int) -> int:
  """S for the block-padded ``sorted`` fallback: a power of two near the mean rows per expert.

  Every expert's segment is padded to a multiple of S and the static block count is
  ``ceil(N/S) + min(E, N)``, so the rows computed are at most ``N + E*S``: small S wastes
  fewer rows, large S gives the batched matmul bigger (more efficient) blocks. Measured on CPU
  (scripts/bench_routing.py) the best S is about the mean segment length ``N/E``, clipped to
  [16, 128].
  """
  mean = max(1, num_assignments // max(1, num_experts))
  return int(min(128, max(16, 1 << (mean.bit_length() - 1))))


def _grouped_blocked(x, a, b, idx, coef, block_rows):
  """Grouped LoRA for assignments sorted by expert, in fixed-size blocks, without ragged_dot.

  Scatter-free: each padded slot *gathers* its source token (XLA:CPU scatters are an
  element-wise loop, far slower than a row gather), the per-assignment coefficient multiplies
  the R-wide hidden ``h`` (not the F-wide output), and the K outputs of each token are gathered
  back from the padded layout and summed. Padded slots read some valid token and are never read
  back, so they cost flops but do not change values or gradients.

  Args:
    x: [T, D].
    a: [E, D, R].
    b: [E, R, F].
    idx: [T, K] expert ids.
    coef: [T, K] per-assignment coefficient in ``x.dtype``.
    block_rows: S, static.

  Returns:
    [T, F].
  """
  t, k = idx.shape
  e, d, _ = a.shape
  n = t * k
  s = block_rows
  num_blocks = -(-n // s) + min(e, n)  # G, static upper bound on padded blocks
  flat_ids = idx.reshape(n)  # [N]
  order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)  # [N] sorted pos -> assignment
  group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)  # [E]
  start = jnp.cumsum(group_sizes) - group_sizes  # [E] first sorted position of each expert
  padded = ((group_sizes + s - 1) // s) * s  # [E]
  padded_end = jnp.cumsum(padded)  # [E]
  padded_start = padded_end - padded
  block_start = jnp.arange(num_blocks, dtype=jnp.int32) * s  # [G]
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side="right"),
                             e - 1).astype(jnp.int32)  # [G]
  slot_expert = jnp.repeat(block_expert, s, total_repeat_length=num_blocks * s)  # [G*S]
  offset = jnp.arange(num_blocks * s, dtype=jnp.int32) - padded_start[slot_expert]
  src_sorted = jnp.clip(start[slot_expert] + offset, 0, n - 1)  # [G*S]
  src = order[src_sorted]  # [G*S] assignment read by each slot (padding: any valid one)
  x_pad = jnp.take(x, src // k, axis=0).reshape(num_blocks, s, d)  # [G, S, D]
  c_pad = jnp.take(coef.reshape(n), src).reshape(num_blocks, s, 1)  # [G, S, 1]
  h = jnp.einsum("gsd,gdr->gsr", x_pad, jnp.take(a, block_expert, axis=0)) * c_pad  # [G, S, R]
  y_pad = jnp.einsum("gsr,grf->gsf", h, jnp.take(b, block_expert, axis=0))  # [G, S, F]
  y_pad = y_pad.reshape(num_blocks * s, -1)  # [G*S, F]
  # Slot of each assignment: its rank within its expert, offset by the expert's padded start.
  sorted_pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # [N]
  dest = padded_start[flat_ids] + sorted_pos - start[flat_ids]  # [N]
  dest = dest.reshape(t, k)  # [T, K]
  out = y_pad[dest[:, 0]]  # [T, F]; per-k row gathers fuse with the sum
  for j in range(1, k):
    out = out + y_pad[dest[:, j]]
  return out


def sorted_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
  """C for the capacity fast path: ``ceil(cf * m + 4 * sqrt(m))`` for mean rows ``m = N/E``.

  The ``4 sqrt(m)`` margin covers the spread of a balanced random routing (Poisson-like counts)
  so that the exact fallback stays rare; clipped to [8, N].
  """
  mean = num_assignments / max(1, num_experts)
  c = math.ceil(capacity_factor * mean + 4.0 * math.sqrt(mean))
  return int(max(1, min(num_assignments, max(8, c))))


def _grouped_capacity(x, a, b, idx, coef, capacity):
  """Grouped LoRA with a static per-expert capacity C (exact when every expert has <= C rows).

  Expert ``e``'s i-th assignment (in token order) goes to slot ``(e, i)`` of an ``[E, C]`` grid;
  empty slots read token 0 with coefficient 0. The grid runs as two batched matmuls against the
  stacked ``A [E, D, R]`` / ``B [E, R, F]`` directly (no per-block weight gather), and each
  token gathers its K output rows back. Scatter-free. The caller guarantees
  ``max(group_sizes) <= C`` (`_sorted` checks it and otherwise takes the blocked path).

  Args:
    x: [T, D].
    a: [E, D, R].
    b: [E, R, F].
    idx: [T, K] expert ids.
    coef: [T, K] per-assignment coefficient in ``x.dtype``.
    capacity: C, static.

  Returns:
    [T, F].
  """
  t, k = idx.shape
  e = a.shape[0]
  n = t * k
  c = capacity
  flat_ids = idx.reshape(n)  # [N]
  order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)  # [N] sorted pos -> assignment
  group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)  # [E]
  start = jnp.cumsum(group_sizes) - group_sizes  # [E]
  slot = jnp.arange(c, dtype=jnp.int32)  # [C]
  valid = slot[None, :] < group_sizes[:, None]  # [E, C]
  src = order[jnp.clip(start[:, None] + slot[None, :], 0, n - 1)]  # [E, C] assignment per slot
  x_grid = jnp.take(x, (src // k).reshape(e * c), axis=0).reshape(e, c, -1)  # [E, C, D]
  c_grid = jnp.where(valid, jnp.take(coef.reshape(n), src), 0).astype(x.dtype)  # [E, C]
  h = jnp.einsum("ecd,edr->ecr", x_grid, a) * c_grid[..., None]  # [E, C, R]
  y_grid = jnp.einsum("ecr,erf->ecf", h, b).reshape(e * c, -1)  # [E*C, F]
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # [N]
  dest = (flat_ids * c + rank - start[flat_ids]).reshape(t, k)  # [T, K] slot of each assignment
  out = y_grid[dest[:, 0]]  # [T, F]; per-k row gathers fuse with the sum (no [T, K, F] buffer)
  for j in range(1, k):
    out = out + y_grid[dest[:, j]]
  return out


def chunk_byte_budget() -> int:
  """Grid byte budget of the CPU ``sorted`` token chunk: 16 MB, or 48 MB under heap mode.

  The 16 MB budget keeps each grid below glibc's mmap threshold. When
  `phatgoose_jax.cpu_malloc.keep_buffers_on_heap` is in effect no buffer is mmap-ed, and larger
  chunks are faster on skewed routings: traced T5-base routings at E=36, T=1024, 768->2048 /
  2048->768 (LoRA only, heap): Tc=1024 (34 MB grid) 4.4 / 4.9 ms vs Tc=256 (the 16 MB choice)
  5.4 / 7.8 ms; with the default allocator Tc=1024 measured 14.1 / 13.9 ms. Read at trace time.
  """
  from phatgoose_jax import cpu_malloc  # pylint: disable=g-import-not-at-top
  return _CHUNK_BYTES_HEAP if cpu_malloc.mode() == "heap" else _CHUNK_BYTES


def sorted_chunk_tokens(num_tokens: int, top_k: int, dim: int, capacity_factor: float,
                        num_experts: int | None = None,
                        byte_budget: int | None = None) -> int:
  """Tokens per chunk of the CPU 'sorted' path (Tc), a power of two >= 128 (or T when smaller).

  Two measured effects set Tc (2 CPU cores, docs/benchmarks.md "Token chunk of the CPU
  'sorted' path"):

  * buffer size: XLA:CPU buffers above glibc's mmap threshold (32 MB at most) are mapped fresh
    on every call and pay a page fault per 4 KB page (~0.4 ms/MB), and smaller grids stay in
    cache. Tc is the largest power of two whose ``[E, C, max(D, F)]`` float32 grid, with the
    capacity ``C = sorted_capacity(Tc*K, E, cf)`` margin included, fits 16 MB (48 MB when
    buffers are kept on the heap, `chunk_byte_budget`);
  * per-expert overhead: every chunk runs E-wide batched matmuls whose fixed cost grows with E,
    so Tc is at least ``16*E/K`` (about 16 assignments per expert), capped at 1024. At E=166 and
    T=1024, Tc=1024 measured 12.8 / 26.3 / 28.3 ms (768->768 / 768->2048 / 2048->768) against
    14.3 / 31.2 / 30.8 ms at Tc=512; at E=36, 768->2048, Tc=256 measured 10.7 ms vs 19.7 ms at
    Tc=512 (whose 19 MB grid exceeds the budget).

  Without ``num_experts`` (legacy call) the grid is estimated as ``cf*Tc*K`` rows, ignoring the
  capacity margin and the per-expert term.

  Args:
    num_tokens: T.
    top_k: K.
    dim: max(D, F).
    capacity_factor: cf of ``sorted_capacity``.
    num_experts: E; None for the legacy estimate.
    byte_budget: grid budget in bytes; None: `chunk_byte_budget` (16 MB, 48 MB in heap mode).

  Returns:
    Tc.
  """
  row_bytes = 4 * max(1, dim)
  budget = chunk_byte_budget() if byte_budget is None else int(byte_budget)
  if num_experts is None:
    rows = budget // row_bytes  # grid rows that fit the budget
    tokens = max(128, int(rows / max(1e-6, capacity_factor * top_k)))
  else:
    tokens = 128
    while (tokens < num_tokens and tokens < (1 << 16) and num_experts * sorted_capacity(
        2 * tokens * top_k, num_experts, capacity_factor) * row_bytes <= budget):
      tokens *= 2
    tokens = max(tokens, min(_CHUNK_MAX_TOKENS_FOR_EXPERTS,
                             _CHUNK_ROWS_PER_EXPERT * num_experts // max(1, top_k)))
  tokens = 1 << (int(tokens).bit_length() - 1)
  return num_tokens if num_tokens <= tokens else tokens


SORTED_FALLBACKS = ("auto", "blocked", "chunked_gather")


def sorted_fallback(num_experts: int) -> str:
  """The exact path the CPU ``sorted`` chunk takes when an expert overflows its capacity.

  ``'blocked'`` pads every expert's rows to a multiple of S and computes ``ceil(N/S) +
  min(E, N)`` blocks whatever the routing; ``'chunked_gather'`` costs ~N gathered weight rows
  whatever E or the routing. Measured on routings traced from the benchmark's T5-base model
  (skewed: up to 25% of the assignments on one expert; 2 CPU cores, T=1024, sorted's own
  token chunks; docs/benchmarks.md): at E=36 ``blocked`` 5.8 / 7.8 / 2.5 ms vs
  ``chunked_gather`` 10.7 / 11.8 / 5.8 ms (768->2048 / 2048->768 / 768->768); at E=166
  ``blocked`` 28 / 50 / 17 ms vs ``chunked_gather`` 10.3 / 12.3 / 5.4 ms. So ``blocked`` up to
  ``_BLOCKED_FALLBACK_MAX_EXPERTS`` experts, ``chunked_gather`` above.
  """
  return "blocked" if num_experts <= _BLOCKED_FALLBACK_MAX_EXPERTS else "chunked_gather"


def _capacity_or_fallback(x, a, b, idx, coef, capacity, block_rows, fallback="auto"):
  """`_grouped_capacity` when no expert exceeds C rows, else an exact fallback (``lax.cond``).

  The fallback is `_grouped_blocked` or `_chunked_gather_coef` (`sorted_fallback` under
  ``'auto'``). Only the taken branch runs; with the ``chunked_gather`` fallback a balanced
  routing costs what the capacity path costs and a skewed one what ``chunked_gather`` costs.
  """
  e = a.shape[0]
  if fallback == "auto":
    fallback = sorted_fallback(e)
  if fallback == "blocked":
    other = lambda *ops: _grouped_blocked(*ops, block_rows)
  else:
    other = _chunked_gather_coef
  group_sizes = jnp.bincount(idx.reshape(-1), length=e)  # [E]
  return jax.lax.cond(jnp.max(group_sizes) <= capacity,
                      lambda *ops: _grouped_capacity(*ops, capacity),
                      other, x, a, b, idx, coef)


def _pad_ids(idx, pad: int, num_experts: int):
  """``idx`` [T, K] followed by ``pad`` padding tokens whose ids cycle over the experts.

  Padding rows carry coefficient 0 and are dropped; spreading them keeps a padded last chunk
  from overflowing one expert's capacity (all on expert 0, 84 padding tokens of a 128-token
  chunk would exceed C for any E > 1)."""
  k = idx.shape[1]
  filler = (jnp.arange(pad * k, dtype=idx.dtype) % num_experts).reshape(pad, k)
  return jnp.concatenate([idx, filler], axis=0)


def _chunked_capacity(x, a, b, idx, coef, tc, capacity_factor, block_rows, fallback):
  """Capacity grid (or its exact fallback) per chunk of ``tc`` tokens (``lax.map``)."""
  t, k = idx.shape
  e = a.shape[0]
  nc = tc * k
  c = sorted_capacity(nc, e, capacity_factor)
  s = sorted_block_rows(nc, e) if block_rows is None else int(block_rows)
  s = max(1, min(s, nc))
  if tc >= t:
    return _capacity_or_fallback(x, a, b, idx, coef, c, s, fallback)
  chunks = -(-t // tc)
  pad = chunks * tc - t
  # Padded tokens have coefficient 0 and ids spread over the experts (rows dropped below).
  xp = jnp.pad(x, ((0, pad), (0, 0))).reshape(chunks, tc, -1)  # [chunks, Tc, D]
  ip = _pad_ids(idx, pad, e).reshape(chunks, tc, k)  # [chunks, Tc, K]
  cp = jnp.pad(coef, ((0, pad), (0, 0))).reshape(chunks, tc, k)  # [chunks, Tc, K]
  out = jax.lax.map(
      lambda ops: _capacity_or_fallback(ops[0], a, b, ops[1], ops[2], c, s, fallback),
      (xp, ip, cp))  # [chunks, Tc, F]
  return out.reshape(chunks * tc, -1)[:t]


def gather_chunk_assignments(num_assignments: int, dim_in: int, dim_out: int, rank: int,
                             itemsize: int = 4) -> int:
  """Nc, assignments per ``chunked_gather`` chunk: the gathered ``A``/``B`` stay <= 12 MB.

  A power of two >= 8 with ``Nc * R * (D + F) * itemsize <= 12 MB`` (below glibc's mmap threshold,
  so the chunk buffers are reused instead of page-faulted on every call), or N itself when N is
  smaller. Measured on 2 CPU cores at E=1000 (docs/benchmarks.md): 4-8 MB and 12 MB chunks ran
  alike, 25 MB ones ~30% slower at F=2048.
  """
  per_row = max(1, rank * (dim_in + dim_out) * itemsize)
  rows = max(8, _GATHER_CHUNK_BYTES // per_row)
  rows = 1 << (int(rows).bit_length() - 1)
  return int(max(1, min(num_assignments, rows)))


def _chunked_gather_coef(x, a, b, idx, coef, chunk_assignments=None):
  """Assignments sorted by expert, in chunks of Nc; each chunk gathers its experts' A/B.

  Args:
    x: [T, D].
    a: [E, D, R].
    b: [E, R, F].
    idx: [T, K] expert ids.
    coef: [T, K] per-assignment coefficient in ``x.dtype``.
    chunk_assignments: Nc (static); default ``gather_chunk_assignments``.

  Returns:
    [T, F].
  """
  t, k = idx.shape
  n = t * k
  f = b.shape[-1]
  if chunk_assignments is None:
    nc = gather_chunk_assignments(n, a.shape[1], f, a.shape[2], jnp.dtype(x.dtype).itemsize)
  else:
    nc = max(1, min(int(chunk_assignments), n))
  coef = coef.reshape(n)  # [N]
  flat_ids = idx.reshape(n)  # [N]
  order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)  # [N] sorted pos -> assignment
  chunks = -(-n // nc)
  # Padded positions recompute assignment 0; their rows are never read back (no value/gradient).
  order_pad = jnp.pad(order, (0, chunks * nc - n)).reshape(chunks, nc)  # [chunks, Nc]

  def chunk(rows):  # rows: [Nc] assignment ids
    experts = flat_ids[rows]  # [Nc]
    xs = jnp.take(x, rows // k, axis=0)  # [Nc, D]
    h = jnp.einsum("nd,ndr->nr", xs, jnp.take(a, experts, axis=0))  # [Nc, R]
    h = h * coef[rows][:, None]  # coefficient on the narrow side
    return jnp.einsum("nr,nrf->nf", h, jnp.take(b, experts, axis=0))  # [Nc, F]

  if chunks == 1:
    ys = chunk(order_pad[0])  # [N, F]
  else:
    ys = jax.lax.map(chunk, order_pad).reshape(chunks * nc, f)  # [chunks*Nc, F] sorted order
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # [N]
  rank = rank.reshape(t, k)  # [T, K] sorted position of each assignment
  out = ys[rank[:, 0]]  # [T, F]; per-k row gathers fuse with the sum
  for j in range(1, k):
    out = out + ys[rank[:, j]]
  return out
