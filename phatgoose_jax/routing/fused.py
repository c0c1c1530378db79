"""One router matmul for several sites that read the same input (q/k/v; wi_0/wi_1).

Letters used in shape comments:
  T tokens (any leading dims ``[...]``), D site input width, E experts of one site, S sites that
  share the input, K experts kept per token.

PHATGOOSE (Muqeeth et al., ICML 2024, Sec. 3) routes every site with its own gate vectors, so the
attention projections q, k and v of a layer (and the gated FFN's wi_0 and wi_1) score the *same*
token activation against S different gate tables. `phatgoose_route` per site standardises the
input S times and runs S skinny ``[T, D] x [D, E]`` matmuls; `fused_phatgoose_route` standardises
once and runs one ``[T, D] x [D, S*E]`` matmul (same flops, one wider GEMM, one pass over ``x``),
then splits the logits and applies each site's softmax/top-k exactly as `phatgoose_route`
(float32 router whatever the compute dtype; official-code conventions documented there).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from phatgoose_jax.routing.scores import PHATGOOSE_LN_EPS, PHATGOOSE_TOPK_EPS
from phatgoose_jax.routing.scores import native_router, native_top_k_routing
from phatgoose_jax.routing.scores import standardize, top_k_routing
from phatgoose_jax.routing.types import Routing, RoutingError


def standardized_gates(gates: jax.Array, ln_eps: float = PHATGOOSE_LN_EPS) -> jax.Array:
  """``LN(gates) / sqrt(D)`` in float32: the per-site router table, computable once per library.

  Args:
    gates: [E, D] PHATGOOSE gate vectors.
    ln_eps: layer-norm epsilon.

  Returns:
    [E, D] float32.
  """
  gates = jnp.asarray(gates)
  if gates.ndim != 2:
    raise RoutingError(f"standardized_gates: gates must be [E, D], got shape {gates.shape}")
  return standardize(gates, ln_eps) * math.sqrt(1.0 / gates.shape[-1])


def fused_phatgoose_route(x: jax.Array, gates: Sequence[jax.Array], top_k: int, *,
                          ln_eps: float = PHATGOOSE_LN_EPS,
                          renormalize_eps: Optional[float] = PHATGOOSE_TOPK_EPS,
                          prepared: bool = False) -> list[Routing]:
  """`phatgoose_route` of one input against S gate tables with a single router matmul.

  Args:
    x: [..., D] the shared site input (any float dtype; the router runs in float32).
    gates: S arrays [E_s, D] (raw gates, or `standardized_gates` outputs if ``prepared``).
    top_k: K.
    ln_eps: layer-norm epsilon (torch default 1e-5).
    renormalize_eps: see `top_k_routing`.
    prepared: the gates are already ``LN(g)/sqrt(D)`` (skip standardising them per call).

  Returns:
    S Routings with indices/weights [..., K], equal to ``phatgoose_route(x, gates[s], top_k)``.
  """
  x = jnp.asarray(x)
  if not gates:
    raise RoutingError("fused_phatgoose_route: gates must be a non-empty sequence of [E, D]")
  tables = []
  for i, g in enumerate(gates):
    g = jnp.asarray(g)
    if g.ndim != 2 or x.ndim < 1 or g.shape[-1] != x.shape[-1]:
      raise RoutingError(f"fused_phatgoose_route: gates[{i}] shape {g.shape} must be [E, D] with "
                         f"D = x last dim {x.shape[-1:]}")
    tables.append(g.astype(jnp.float32) if prepared else standardized_gates(g, ln_eps))
  sizes = [t.shape[0] for t in tables]
  table = jnp.concatenate(tables, axis=0)  # [S*E, D] float32
  x_n = standardize(x, ln_eps)  # [..., D] float32
  if all(native_router(x_n.dtype, top_k, size) for size in sizes):
    # Native path: one expert-major matmul [S*E, T], then each site's rows through the kernel.
    return native_top_k_routing(x_n, table.astype(x_n.dtype), top_k, 1.0, renormalize_eps,
                                sizes)
  logits = jnp.einsum("...d,ed->...e", x_n, table.astype(x_n.dtype),
                      precision=jax.lax.Precision.HIGHEST)  # [..., S*E]
  out, start = [], 0
  for size in sizes:
    out.append(top_k_routing(logits[..., start:start + size], top_k,
                             renormalize_eps=renormalize_eps))
    start += size
  return out
