"""Routed LoRA: ``out[t] = sum_k w[t,k] * s[idx[t,k]] * (x[t] @ A[idx[t,k]]) @ B[idx[t,k]]``.

Letters used in shape comments:
  T tokens (leading dims flattened), D site input, F site output, E experts, K top-k, R LoRA
  rank, N = T*K token-expert assignments, G padded blocks, S rows per block, C slots per expert
  (capacity).

Several backends compute the same function with different cost profiles; all are jittable,
differentiable w.r.t. ``x``, ``lora_a``, ``lora_b`` and ``routing.weights`` and accept any
leading dims:

  * ``oracle``: loop over experts, dense [T] mask per expert. E full LoRA passes. The reference.
  * ``dense``: dense-concat. ``h = x @ A_cat [D, E*R]``, scale each expert's R columns by that
    token's (summed) weight for the expert, ``@ B_cat [E*R, F]``. Two GEMMs, cost ~ T*E*R*(D+F);
    best when E*R is small relative to D.
  * ``gather``: gather the K chosen ``A [D, R]`` / ``B [R, F]`` per token, then einsum. Cost
    ~ T*K*R*(D+F) flops but T*K*(D*R + R*F) gathered memory; best for tiny T (decoding).
  * ``sorted``: flatten the N = T*K assignments, sort by expert, grouped matmul, unsort, weighted
    sum. Uses ``jax.lax.ragged_dot`` on GPU/TPU (native grouped GEMM). Elsewhere (CPU, where
    ragged_dot decomposes into an E-times-masked dense product) the tokens are processed in
    chunks of Tc (so that no buffer exceeds ~16 MB, 48 MB in `cpu_malloc` heap mode: larger
    XLA:CPU buffers are mmap-ed fresh and page-fault on every call) and each chunk takes
      - the capacity fast path when every expert has <= C = ceil(cf*m + 4*sqrt(m)) of the
        chunk's assignments (m = Tc*K/E, cf = ``capacity_factor``, default 1.5): an
        [E, C] slot grid, two batched matmuls against A [E, D, R] / B [E, R, F] as stored;
      - otherwise (``lax.cond``, exact) a fallback (``fallback``, see ``sorted_fallback``):
        ``'blocked'``, each expert's segment padded to a multiple of S rows, each S-row block
        gathering its expert's A/B once, a batched matmul over the G <= ceil(N/S) + min(E, N)
        blocks (E <= 64); or ``'chunked_gather'`` (below), whose cost does not depend
        on E or on how skewed the routing is.
    All are exact (no token is ever dropped). ``block_rows`` without ``capacity_factor``, or
    ``capacity_factor=0``, forces the block-padded path.
  * ``chunked_gather``: for many experts on CPU. The N assignments are sorted by expert and
    processed in chunks of Nc (``lax.map``); each chunk gathers its Nc rows of ``x`` and its
    experts' ``A [Nc, D, R]`` / ``B [Nc, R, F]`` (kept <= 12 MB, see
    ``gather_chunk_assignments``), applies them row by row and the K outputs of each token are
    gathered back and summed. Cost ~ N*R*(D+F) flops plus N*R*(D+F) gathered weights, whatever
    E: no per-expert padding or per-expert matmul, which dominate ``sorted`` when each expert
    sees only a few rows (E=1000, T=1024: ~2 rows per expert). Sorting makes consecutive
    gathers of one expert hit the cache. Gradients w.r.t. ``A``/``B`` are scatter-adds of the
    per-chunk gathers into [E, D, R] / [E, R, F].
  * ``auto``: see ``choose_backend``.

Numerics: the LoRA matmuls run in ``x.dtype`` (the compute dtype; ``lora_a``/``lora_b`` are cast
to it); the per-assignment coefficient ``w * scale[idx]`` is formed in float32 and cast to
``x.dtype``; the output has ``x.dtype``.
"""
from __future__ import annotations

import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax.routing.types import Routing, RoutingError, check_routing

BACKENDS = ("auto", "oracle", "dense", "gather", "sorted", "chunked_gather")
Scale = Union[float, jax.Array]

# Heuristic thresholds for choose_backend (see its docstring).
_GATHER_MAX_ASSIGNMENTS = 128
_DENSE_MIN_COLUMNS = 256
# CPU: 'chunked_gather' below this many assignments per expert in a 'sorted' token chunk.
_CHUNKED_GATHER_MAX_ROWS_PER_EXPERT = 5
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


def choose_backend(num_tokens: int, dim_in: int, num_experts: int, rank: int, top_k: int,
                   platform: str | None = None) -> str:
  """The backend ``'auto'`` uses, from static shapes and the platform (deterministic).

  1. ``T*K <= 128`` (decoding steps, tiny batches): ``gather``; the gathered weights are small
     and no E-wide work is done.
  2. ``E*R <= 256``: ``dense``; the concatenated LoRA is narrow, so two plain GEMMs beat any
     sort/gather overhead even though they spend E/K times the necessary flops. (The former
     ``E*R <= D/2`` clause picked ``dense`` for 2048->768 at E=36, where CPU ``sorted`` measured
     1.90 vs 4.26 ms at T=128, 14.2 vs 17.6 ms at T=1024 and 59.6 vs 65.3 ms at T=4096.)
  3. GPU/TPU with many experts: ``sorted`` (``ragged_dot`` grouped GEMM, ~T*K*R*(D+F) flops).
  4. CPU with many experts: ``chunked_gather`` when the mean assignments per expert in one
     token chunk of the CPU ``sorted`` path, ``m = min(T, Tc)*K/E`` (``Tc =
     sorted_chunk_tokens(T, K, D, 1.5, E)``), is below 5; else ``sorted`` when E/K > 8, else
     ``dense``. The CPU ``sorted`` path runs its capacity grid when no expert overflows it and
     otherwise an exact fallback chosen by E (``sorted_fallback``: ``blocked`` up to 64
     experts, else ``chunked_gather``), so a skewed routing costs about what
     ``chunked_gather`` costs and a balanced one what the capacity grid costs. Measured (2 CPU
     cores, R=16, K=2, routings traced from the benchmark's T5-base model; docs/benchmarks.md
     "Backend choice on CPU"): E=166, T=1024, skewed sites ``sorted`` 10.3 / 12.3 / 5.4 ms vs
     ``chunked_gather`` 10.0 / 12.3 / 5.3 ms (768->2048 / 2048->768 / 768->768), balanced
     sites 3.5-4.0 vs 5.7-5.9 ms, T=4096 balanced 16.3 vs 23.9 ms. (Until 2026-11-26 the rule
     sent every E >= 128 to ``chunked_gather`` because the old ``blocked``-only fallback cost
     28-50 ms on those skewed sites.) ``chunked_gather`` wins at m < 5 (E=1000 any T:
     1.4-10x; E=166, T=128: 2.9 / 5.1 vs 7.4 / 4.8-8.7 ms at 768->2048 / 2048->768);
     ``sorted`` at E=36 (T=128: 2-3x; T=1024: 1.3-2.5x).

  Args:
    num_tokens: T (product of the leading dims).
    dim_in: D.
    num_experts: E.
    rank: R.
    top_k: K.
    platform: ``jax.default_backend()`` when None.

  Returns:
    ``'dense'``, ``'gather'``, ``'sorted'`` or ``'chunked_gather'`` (never ``'oracle'``).
  """
  platform = platform or jax.default_backend()
  if num_tokens * top_k <= _GATHER_MAX_ASSIGNMENTS:
    return "gather"
  if num_experts * rank <= _DENSE_MIN_COLUMNS:
    return "dense"
  if platform in ("gpu", "cuda", "rocm", "tpu"):
    return "sorted"
  chunk = sorted_chunk_tokens(num_tokens, top_k, dim_in, DEFAULT_CAPACITY_FACTOR, num_experts)
  if min(num_tokens, chunk) * top_k < _CHUNKED_GATHER_MAX_ROWS_PER_EXPERT * num_experts:
    return "chunked_gather"
  return "sorted" if num_experts > 8 * top_k else "dense"


def _expert_scale(scale: Scale, num_experts: int) -> jax.Array:
  """``scale`` (python float, scalar or [E]) as a float32 [E] vector."""
  s = jnp.asarray(scale)
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  if s.ndim == 0:
    return jnp.broadcast_to(s, (num_experts,))
  if s.shape != (num_experts,):
    raise RoutingError(
        f"routed_lora: scale must be a float or an [E={num_experts}] array, got shape {s.shape}")
  return s


def _oracle(x, a, b, idx, w, scale):
  """Naive reference: every expert on every token, masked by its routing weight."""
  out = jnp.zeros(x.shape[:-1] + (b.shape[-1],), x.dtype)  # [T, F]
  for e in range(a.shape[0]):
    mask = jnp.sum(jnp.where(idx == e, w, 0.0), axis=-1)  # [T] float32
    coef = (mask * scale[e]).astype(x.dtype)  # [T]
    out = out + coef[:, None] * ((x @ a[e]) @ b[e])
  return out


def _coefficients(idx, w, scale, dtype):
  """Per-assignment coefficient ``w * scale[idx]`` ([T, K], float32 math, cast to ``dtype``)."""
  return (w * jnp.take(scale, idx)).astype(dtype)


def _dense(x, a, b, idx, w, scale):
  e, d, r = a.shape
  f = b.shape[-1]
  a_cat = jnp.transpose(a, (1, 0, 2)).reshape(d, e * r)  # [D, E*R]
  b_cat = b.reshape(e * r, f)  # [E*R, F]
  coef = w * jnp.take(scale, idx)  # [T, K] float32
  # Dense [T, E] weight per expert; duplicate ids in a row add up.
  gate = jnp.sum(jax.nn.one_hot(idx, e, dtype=coef.dtype) * coef[..., None], axis=-2)  # [T, E]
  gate_cols = jnp.repeat(gate, r, axis=-1).astype(x.dtype)  # [T, E*R]
  h = (x @ a_cat) * gate_cols  # [T, E*R]
  return h @ b_cat


def _gather(x, a, b, idx, w, scale):
  coef = _coefficients(idx, w, scale, x.dtype)  # [T, K]
  a_sel = jnp.take(a, idx, axis=0)  # [T, K, D, R]
  b_sel = jnp.take(b, idx, axis=0)  # [T, K, R, F]
  h = jnp.einsum("td,tkdr->tkr", x, a_sel)  # [T, K, R]
  y = jnp.einsum("tkr,tkrf->tkf", h, b_sel)  # [T, K, F]
  return jnp.einsum("tkf,tk->tf", y, coef)


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


def _sorted(x, a, b, idx, w, scale, use_ragged_dot=None, block_rows=None, capacity_factor=None,
            chunk_tokens=None, fallback="auto"):
  t, k = idx.shape
  e = a.shape[0]
  n = t * k
  if use_ragged_dot is None:
    use_ragged_dot = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
  coef = _coefficients(idx, w, scale, x.dtype)  # [T, K]
  if not use_ragged_dot:
    if capacity_factor is None:
      capacity_factor = 0.0 if block_rows is not None else DEFAULT_CAPACITY_FACTOR
    if capacity_factor <= 0:
      s = sorted_block_rows(n, e) if block_rows is None else int(block_rows)
      return _grouped_blocked(x, a, b, idx, coef, max(1, min(s, n)))
    if fallback not in SORTED_FALLBACKS:
      raise RoutingError(f"routed_lora: sorted fallback must be one of {SORTED_FALLBACKS}, got "
                         f"{fallback!r}")
    dim = max(a.shape[1], b.shape[2])
    if chunk_tokens is not None:
      tc = max(1, min(int(chunk_tokens), t))
      return _chunked_capacity(x, a, b, idx, coef, tc, capacity_factor, block_rows, fallback)
    # A wrapping lax.cond that picked small chunks for balanced routings and large ones for
    # skewed routings measured slower than either (XLA:CPU: +8 ms on a 53 ms site), so the
    # chunk size is static (`sorted_chunk_tokens`, budget by allocator mode).
    tc = sorted_chunk_tokens(t, k, dim, capacity_factor, e)
    return _chunked_capacity(x, a, b, idx, coef, tc, capacity_factor, block_rows, fallback)
  flat_ids = idx.reshape(n)  # [N]
  order = jnp.argsort(flat_ids, stable=True)  # [N]
  token_of = order // k  # [N] source token of each sorted assignment
  xs = jnp.take(x, token_of, axis=0)  # [N, D]
  group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)  # [E]
  h = jax.lax.ragged_dot(xs, a, group_sizes)  # [N, R]
  h = h * jnp.take(coef.reshape(n), order)[:, None]  # [N, R] coefficient on the narrow side
  ys = jax.lax.ragged_dot(h, b, group_sizes)  # [N, F]
  inverse = jnp.argsort(order)  # [N] unsort permutation
  y = jnp.take(ys, inverse, axis=0).reshape(t, k, -1)  # [T, K, F]
  return jnp.sum(y, axis=1)


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


def _chunked_gather(x, a, b, idx, w, scale, chunk_assignments=None):
  """``chunked_gather`` backend: `_chunked_gather_coef` with coefficients ``w * scale[idx]``."""
  return _chunked_gather_coef(x, a, b, idx, _coefficients(idx, w, scale, x.dtype),
                              chunk_assignments)


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


_IMPLS = {"oracle": _oracle, "dense": _dense, "gather": _gather, "sorted": _sorted,
          "chunked_gather": _chunked_gather}
# Keyword options each backend accepts through ``routed_lora(**backend_kwargs)``.
_OPTIONS = {"sorted": ("use_ragged_dot", "block_rows", "capacity_factor", "chunk_tokens",
                       "fallback"),
            "chunked_gather": ("chunk_assignments",)}


def routed_lora(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array, routing: Routing,
                scale: Scale = 1.0, backend: str = "auto", **backend_kwargs) -> jax.Array:
  """Applies a routed library of LoRA experts to ``x``.

  ``out[t] = sum_k routing.weights[t,k] * scale[e] * (x[t] @ lora_a[e]) @ lora_b[e]`` with
  ``e = routing.indices[t,k]``. Duplicate ids in a row simply add up. Ids outside ``[0, E)``
  cannot be checked under jit and give undefined results.

  Args:
    x: [..., D] site input in the compute dtype.
    lora_a: [E, D, R] stacked LoRA down-projections.
    lora_b: [E, R, F] stacked LoRA up-projections.
    routing: Routing with indices/weights [..., K] matching ``x``'s leading dims.
    scale: python float, scalar, or [E] per-expert scale (imported experts may differ, e.g.
      ``alpha / r`` of each PEFT adapter, or PHATGOOSE's ``1 / d_bottleneck``).
    backend: one of ``'auto'``, ``'oracle'``, ``'dense'``, ``'gather'``, ``'sorted'``,
      ``'chunked_gather'``.
    **backend_kwargs: options of ``'sorted'`` (``use_ragged_dot``, ``block_rows``,
      ``capacity_factor``, ``chunk_tokens``, ``fallback``; CPU path options, see the module
      docstring) or of
      ``'chunked_gather'`` (``chunk_assignments``). Under ``'auto'`` the options of the backends
      it does not pick are ignored.

  Returns:
    [..., F] in ``x.dtype``.
  """
  x = jnp.asarray(x)
  lora_a = jnp.asarray(lora_a)
  lora_b = jnp.asarray(lora_b)
  if backend not in BACKENDS:
    raise RoutingError(f"routed_lora: backend must be one of {BACKENDS}, got {backend!r}")
  if lora_a.ndim != 3 or lora_b.ndim != 3:
    raise RoutingError(
        f"routed_lora: lora_a must be [E, D, R] and lora_b [E, R, F], got {lora_a.shape} and "
        f"{lora_b.shape}")
  num_experts, dim_in, rank = lora_a.shape
  if lora_b.shape[:2] != (num_experts, rank):
    raise RoutingError(
        f"routed_lora: lora_b shape {lora_b.shape} must be [E={num_experts}, R={rank}, F]")
  if x.ndim < 1 or x.shape[-1] != dim_in:
    raise RoutingError(f"routed_lora: x last dim {x.shape[-1:]} must equal lora_a D={dim_in}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise RoutingError(f"routed_lora: x must be floating point, got dtype {x.dtype}")
  check_routing(routing, x.shape[:-1], "routed_lora: routing")
  allowed = (sum(_OPTIONS.values(), ()) if backend == "auto" else _OPTIONS.get(backend, ()))
  unknown = sorted(set(backend_kwargs) - set(allowed))
  if unknown:
    raise RoutingError(f"routed_lora: backend {backend!r} takes no options {unknown} "
                       f"(accepted: {sorted(allowed)})")
  batch_shape = x.shape[:-1]
  num_tokens = int(np.prod(batch_shape, dtype=np.int64))
  top_k = routing.top_k
  if backend == "auto":
    backend = choose_backend(num_tokens, dim_in, num_experts, rank, top_k)
  scale_vec = _expert_scale(scale, num_experts)  # [E] float32 (float64 under x64)
  x2 = x.reshape(num_tokens, dim_in)  # [T, D]
  idx = routing.indices.reshape(num_tokens, top_k).astype(jnp.int32)  # [T, K]
  w = routing.weights.reshape(num_tokens, top_k)  # [T, K]
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  a = lora_a.astype(x.dtype)
  b = lora_b.astype(x.dtype)
  # Under 'auto', options of the backends it did not pick are dropped.
  kwargs = {key: v for key, v in backend_kwargs.items() if key in _OPTIONS.get(backend, ())}
  out = _IMPLS[backend](x2, a, b, idx, w, scale_vec, **kwargs)  # [T, F]
  return out.astype(x.dtype).reshape(batch_shape + (lora_b.shape[-1],))
