"""Routed LoRA: ``out[t] = sum_k w[t,k] * s[idx[t,k]] * (x[t] @ A[idx[t,k]]) @ B[idx[t,k]]``.

Letters used in shape comments:
  T tokens (leading dims flattened), D site input, F site output, E experts, K top-k, R LoRA
  rank, N = T*K token-expert assignments, G padded blocks, S rows per block, C slots per expert
  (capacity).

Several backends compute the same function with different cost profiles; all are jittable,
differentiable w.r.t. ``x``, ``lora_a``, ``lora_b`` and ``routing.weights`` and accept any
leading dims. ``cpu_kernel`` (and so ``auto`` on one CPU device, as the native router of
`phatgoose_route`) supports reverse mode (``jax.grad``, first order) through a ``custom_vjp``:
forward-mode (``jax.jvp``) and second derivatives need ``oracle``, ``dense``, ``gather`` or
``sorted`` (or ``PHATGOOSE_JAX_CPU_KERNEL=0``):

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
  * ``cpu_kernel``: the native XLA:CPU custom call of `phatgoose_jax.routing.cpu_kernel`
    (float32, CPU only): assignments counting-sorted by expert, register-blocked ``x A_e`` over
    expert ranges and ``h B_e`` over output-column ranges of the thread pool (each expert's
    weights read once per call), accumulated into ``add_to`` in place. Cost ~ the flops plus
    streaming each assignment's x/y rows and each used expert's weights; no padded grid, no
    fallback. Backward through the exact JAX ``sorted`` path.
  * ``auto``: ``cpu_kernel`` for float32 on a single CPU device when the kernel builds
    (``auto_backend``), else ``choose_backend``.

The CPU paths of ``sorted`` and ``chunked_gather`` (and their measured size rules) live in
`phatgoose_jax.routing.cpu_grouped`.

Numerics: the LoRA matmuls run in ``x.dtype`` (the compute dtype; ``lora_a``/``lora_b`` are cast
to it); the per-assignment coefficient ``w * scale[idx]`` is formed in float32 and cast to
``x.dtype``; the output has ``x.dtype``.
"""
from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

# The CPU paths and their size rules; chunk_byte_budget, gather_chunk_assignments,
# sorted_capacity and sorted_fallback are re-exported here, next to the backends that use them.
from phatgoose_jax.routing.cpu_grouped import (  # noqa: F401
    DEFAULT_CAPACITY_FACTOR, SORTED_FALLBACKS, _chunked_capacity, _chunked_gather_coef,
    _grouped_blocked, chunk_byte_budget, gather_chunk_assignments, sorted_block_rows,
    sorted_capacity, sorted_chunk_tokens, sorted_fallback)
from phatgoose_jax.routing import cpu_kernel
from phatgoose_jax.routing.types import Routing, RoutingError, check_routing

BACKENDS = ("auto", "oracle", "dense", "gather", "sorted", "chunked_gather", "cpu_kernel")
Scale = Union[float, jax.Array]

# Heuristic thresholds for choose_backend (see its docstring).
_GATHER_MAX_ASSIGNMENTS = 128
_DENSE_MIN_COLUMNS = 256
# CPU: 'chunked_gather' below this many assignments per expert in a 'sorted' token chunk.
_CHUNKED_GATHER_MAX_ROWS_PER_EXPERT = 5


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


def auto_backend(num_tokens: int, dim_in: int, num_experts: int, rank: int, top_k: int,
                 dtype=jnp.float32) -> str:
  """What ``routed_lora(backend='auto')`` runs: ``'cpu_kernel'`` for float32 on a single CPU
  device when the native kernel is built (`cpu_kernel.auto_eligible`; it measured faster than
  every JAX CPU path at every benchmarked shape, docs/benchmarks.md), else `choose_backend`."""
  if cpu_kernel.auto_eligible(dtype):
    return "cpu_kernel"
  return choose_backend(num_tokens, dim_in, num_experts, rank, top_k)


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


def sorted_cpu_coef(x, a, b, idx, coef, block_rows=None, capacity_factor=None,
                    chunk_tokens=None, fallback="auto"):
  """The CPU (no ``ragged_dot``) ``sorted`` path on per-assignment coefficients.

  Args:
    x: [T, D]; a: [E, D, R]; b: [E, R, F]; idx: [T, K] int32; coef: [T, K] in ``x.dtype``;
    options as ``routed_lora(backend='sorted')``.

  Returns:
    [T, F].
  """
  t, k = idx.shape
  e = a.shape[0]
  n = t * k
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


def _sorted(x, a, b, idx, w, scale, use_ragged_dot=None, block_rows=None, capacity_factor=None,
            chunk_tokens=None, fallback="auto"):
  t, k = idx.shape
  e = a.shape[0]
  n = t * k
  if use_ragged_dot is None:
    use_ragged_dot = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
  coef = _coefficients(idx, w, scale, x.dtype)  # [T, K]
  if not use_ragged_dot:
    return sorted_cpu_coef(x, a, b, idx, coef, block_rows, capacity_factor, chunk_tokens,
                           fallback)
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


def _chunked_gather(x, a, b, idx, w, scale, chunk_assignments=None):
  """``chunked_gather`` backend: `_chunked_gather_coef` with coefficients ``w * scale[idx]``."""
  return _chunked_gather_coef(x, a, b, idx, _coefficients(idx, w, scale, x.dtype),
                              chunk_assignments)


_IMPLS = {"oracle": _oracle, "dense": _dense, "gather": _gather, "sorted": _sorted,
          "chunked_gather": _chunked_gather}
# Keyword options each backend accepts through ``routed_lora(**backend_kwargs)``.
_OPTIONS = {"sorted": ("use_ragged_dot", "block_rows", "capacity_factor", "chunk_tokens",
                       "fallback"),
            "chunked_gather": ("chunk_assignments",)}


@functools.lru_cache(maxsize=None)
def _jitted_impl(backend: str, options: tuple):
  """The backend as one jitted function per (backend, options) (inlined under an outer jit).

  Called eagerly, `routed_lora` then compiles one program instead of dispatching every op:
  faster, and un-jitted `model.apply` with ``backend='sorted'`` on CPU segfaulted inside
  XLA's compiler when it compiled the capacity path's ``lax.cond`` on its own (jax/jaxlib
  0.10.2; seen in tests/evaluation/test_scoring.py's direct reference with the fixture forced to
  'sorted'), which the whole-function compile avoids.
  """
  return jax.jit(functools.partial(_IMPLS[backend], **dict(options)))


def routed_lora(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array, routing: Routing,
                scale: Scale = 1.0, backend: str = "auto", *, add_to: jax.Array | None = None,
                **backend_kwargs) -> jax.Array:
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
      ``'chunked_gather'``, ``'cpu_kernel'`` (`phatgoose_jax.routing.cpu_kernel`; float32, CPU).
      ``'auto'`` takes ``'cpu_kernel'`` for float32 on a single CPU device when the kernel is
      built (`cpu_kernel.auto_eligible`), else `choose_backend`.
    add_to: optional [..., F] (e.g. the base projection ``x @ W``) returned plus the routed
      delta; ``'cpu_kernel'`` accumulates into its buffer instead of adding a second pass.
    **backend_kwargs: options of ``'sorted'`` (``use_ragged_dot``, ``block_rows``,
      ``capacity_factor``, ``chunk_tokens``, ``fallback``; CPU path options, see the module
      docstring) or of
      ``'chunked_gather'`` (``chunk_assignments``). Under ``'auto'`` the options of the backends
      it does not pick are ignored.

  Returns:
    [..., F] in ``x.dtype`` (``add_to + delta`` when ``add_to`` is given).
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
  check_routing(routing, x.shape[:-1], "routed_lora: routing", num_experts=num_experts)
  allowed = (sum(_OPTIONS.values(), ()) if backend == "auto" else _OPTIONS.get(backend, ()))
  unknown = sorted(set(backend_kwargs) - set(allowed))
  if unknown:
    raise RoutingError(f"routed_lora: backend {backend!r} takes no options {unknown} "
                       f"(accepted: {sorted(allowed)})")
  batch_shape = x.shape[:-1]
  num_tokens = int(np.prod(batch_shape, dtype=np.int64))
  top_k = routing.top_k
  out_shape = batch_shape + (lora_b.shape[-1],)
  if add_to is not None and tuple(jnp.shape(add_to)) != out_shape:
    raise RoutingError(f"routed_lora: add_to shape {tuple(jnp.shape(add_to))} must be "
                       f"{out_shape}")
  if num_tokens * top_k == 0:  # nothing routed (shapes are static): every backend agrees
    out = jnp.zeros(out_shape, x.dtype)
    return out if add_to is None else jnp.asarray(add_to).astype(x.dtype)
  if backend == "auto":
    backend = auto_backend(num_tokens, dim_in, num_experts, rank, top_k, x.dtype)
  scale_vec = _expert_scale(scale, num_experts)  # [E] float32 (float64 under x64)
  x2 = x.reshape(num_tokens, dim_in)  # [T, D]
  idx = routing.indices.reshape(num_tokens, top_k).astype(jnp.int32)  # [T, K]
  w = routing.weights.reshape(num_tokens, top_k)  # [T, K]
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  a = lora_a.astype(x.dtype)
  b = lora_b.astype(x.dtype)
  # Under 'auto', options of the backends it did not pick are dropped.
  kwargs = {key: v for key, v in backend_kwargs.items() if key in _OPTIONS.get(backend, ())}
  if backend == "cpu_kernel":
    base = None if add_to is None else jnp.asarray(add_to).reshape(num_tokens, -1)
    coef = _coefficients(idx, w, scale_vec, x.dtype)  # [T, K]
    out = cpu_kernel.routed_lora_cpu(x2, a, b, idx, coef, add_to=base)  # [T, F]
    return out.astype(x.dtype).reshape(out_shape)
  out = _jitted_impl(backend, tuple(sorted(kwargs.items())))(x2, a, b, idx, w, scale_vec)
  out = out.astype(x.dtype).reshape(out_shape)
  return out if add_to is None else (add_to + out).astype(x.dtype)
