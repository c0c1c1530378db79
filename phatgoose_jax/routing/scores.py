"""Routing scores: PHATGOOSE, generic top-k, uniform and one-hot routing.

Letters used in shape comments:
  T tokens (any leading dims ``[...]``), D site input width, E experts, K experts kept per token.

PHATGOOSE (Muqeeth et al., ICML 2024, "Learning to Route Among Specialized Experts for Zero-Shot
Generalization", Section 3): each expert e has a trained sigmoid gate vector g_e in R^D. At
inference the gates become a router: the token activation u and every gate are standardised
(zero mean, unit variance), scored by a scaled dot product, softmax-ed over all experts, the top-k
kept and their weights renormalised.

Checked against the official code (r-three/phatgoose, ``src/models/addons/moe.py``):
  * ``Router`` with ``score_type="original"`` applies ``torch.nn.LayerNorm(d_router,
    elementwise_affine=False)`` to BOTH the token hidden state (``input_layer_norm``) and the
    expert embeddings (``router_layer_norm``, ``router_norm_type="layer_norm"``): no affine,
    biased variance, torch's default eps 1e-5.
  * ``scaling_scores=True`` multiplies the dot product by ``sqrt(1 / d_router)`` (= D^-1/2).
  * ``router_type="smear"`` then takes a softmax over all E experts.
  * ``FFNExperts`` (token-level dispatch path, 3-D routing weights) with ``topk_value=2``,
    ``normalize_topk=True`` (the README's PHATGOOSE eval bindings) keeps the top-k and divides by
    ``sum + epsilon`` with ``epsilon=1e-6``. So the kept weights sum to ``s / (s + 1e-6)`` (slightly
    below 1), not exactly 1. We match the code and expose the epsilon (``renormalize_eps``).
  * The official router computes in the hidden-state dtype; following this project's convention
    all router math here is float32 whatever the compute dtype (more accurate, same in float32).

Fast path (XLA:CPU, float32, one device, K <= 4, the native kernel built): the router matmul is
written expert-major, ``einsum('ed,td->et')`` (XLA:CPU runs this [E, D] x [D, T] product at
near its GEMM speed; the token-major ``[T, D] x [D, E]`` with E of a few hundred ran ~25%
slower), and softmax + top-k + renormalisation run in one native pass over the [E, T] logits
(`native_router`, `native_top_k_routing`, `cpu_kernel.top_k_softmax_et`). Same formula and tie
rule; weights agree to ~1e-7 relative (a polynomial exp), gradients are the JAX path's.
``PHATGOOSE_JAX_CPU_KERNEL=0`` keeps the pure-JAX path everywhere.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from phatgoose_jax.routing import cpu_kernel
from phatgoose_jax.routing.topk import top_k as _top_k
from phatgoose_jax.routing.types import Routing, RoutingError, check_top_k

# torch.nn.LayerNorm default eps, used by the official router's two layer norms.
PHATGOOSE_LN_EPS = 1e-5
# FFNExperts.epsilon default, added to the top-k renormalisation denominator in the official code.
PHATGOOSE_TOPK_EPS = 1e-6


def standardize(x: jax.Array, eps: float = PHATGOOSE_LN_EPS) -> jax.Array:
  """Layer norm without affine parameters over the last axis, in float32.

  ``(x - mean) / sqrt(var + eps)`` with the biased (1/D) variance, as
  ``torch.nn.LayerNorm(D, elementwise_affine=False)``.

  Args:
    x: [..., D] any floating dtype.
    eps: added to the variance.

  Returns:
    [..., D] float32 (float64 if ``x`` is float64).
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise RoutingError(f"standardize: x must have a trailing feature dim, got shape {x.shape}")
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def top_k_routing(logits: jax.Array, top_k: int,
                  renormalize_eps: Optional[float] = PHATGOOSE_TOPK_EPS) -> Routing:
  """Softmax over all experts, keep the top-k, renormalise (the PHATGOOSE convention).

  Args:
    logits: [..., E] router scores (cast to float32).
    top_k: K, number of experts kept per token.
    renormalize_eps: the kept probabilities ``p`` become ``p / (sum(p) + renormalize_eps)``;
      1e-6 matches the official code; 0.0 renormalises exactly; None keeps the raw softmax
      probabilities of the kept experts (no renormalisation).

  Returns:
    Routing with indices [..., K] int32 (highest probability first) and weights [..., K] float32.
  """
  logits = jnp.asarray(logits)
  if logits.ndim < 1:
    raise RoutingError(f"top_k_routing: logits must be [..., E], got shape {logits.shape}")
  k = check_top_k(top_k, logits.shape[-1], "top_k_routing: top_k")
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)  # [..., E]
  weights, indices = _top_k(probs, k)  # [..., K] (== lax.top_k; reductions for small K)
  if renormalize_eps is not None:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + renormalize_eps)
  return Routing(indices=indices.astype(jnp.int32), weights=weights)


def phatgoose_route(x: jax.Array, gates: jax.Array, top_k: int, *,
                    ln_eps: float = PHATGOOSE_LN_EPS,
                    renormalize_eps: Optional[float] = PHATGOOSE_TOPK_EPS) -> Routing:
  """PHATGOOSE token routing (paper Section 3; official ``Router``/``FFNExperts`` convention).

  ``logits[t, e] = LN(x[t]) . LN(gates[e]) / sqrt(D)`` with LN = standardisation without affine
  (biased variance, eps 1e-5) applied to both tokens and gates; softmax over all E; top-k kept and
  divided by ``sum + 1e-6`` (the official code's epsilon, so weights sum to ``s/(s+1e-6)``).
  All of it in float32 whatever ``x.dtype``.

  Args:
    x: [..., D] token activations at the site input (any float dtype).
    gates: [E, D] the trained PHATGOOSE gate vectors, one per expert.
    top_k: K (2 in the paper).
    ln_eps: layer-norm epsilon (torch default 1e-5).
    renormalize_eps: see ``top_k_routing``.

  Returns:
    Routing with indices [..., K] int32 and weights [..., K] float32.
  """
  x = jnp.asarray(x)
  gates = jnp.asarray(gates)
  if gates.ndim != 2:
    raise RoutingError(f"phatgoose_route: gates must be [E, D], got shape {gates.shape}")
  if x.ndim < 1 or x.shape[-1] != gates.shape[-1]:
    raise RoutingError(
        f"phatgoose_route: x last dim {x.shape[-1:]} must equal gates D={gates.shape[-1]}")
  d = x.shape[-1]
  x_n = standardize(x, ln_eps)  # [..., D] float32
  g_n = standardize(gates, ln_eps).astype(x_n.dtype)  # [E, D]
  if native_router(x_n.dtype, top_k, gates.shape[0]):
    return native_top_k_routing(x_n, g_n, top_k, math.sqrt(1.0 / d), renormalize_eps)[0]
  logits = jnp.einsum("...d,ed->...e", x_n, g_n,
                      precision=jax.lax.Precision.HIGHEST) * math.sqrt(1.0 / d)  # [..., E]
  return top_k_routing(logits, top_k, renormalize_eps=renormalize_eps)


def native_router(dtype, top_k: int, num_experts: int) -> bool:
  """Whether `phatgoose_route` takes the native CPU fast path (see the module docstring)."""
  return cpu_kernel.top_k_softmax_eligible(dtype, top_k, num_experts)


def native_top_k_routing(x_n: jax.Array, table: jax.Array, top_k: int, scale: float,
                         renormalize_eps: Optional[float],
                         sizes: Optional[Sequence[int]] = None) -> list[Routing]:
  """``top_k_routing(einsum(x_n, table) * scale)`` by the expert-major matmul + native kernel.

  Args:
    x_n: [..., D] float32 standardised token activations.
    table: [E_total, D] float32 standardised gates of one or several sites (rows ``sizes``;
      times ``D**-0.5`` already if ``scale`` is 1).
    top_k: K (1..4).
    scale: multiplies the logits.
    renormalize_eps: see `top_k_routing`.
    sizes: experts per site along the table's rows (default: one site, all rows).

  Returns:
    One Routing per site with indices/weights [..., K].
  """
  lead = x_n.shape[:-1]
  logits_et = jnp.einsum("ed,td->et", table, x_n.reshape(-1, x_n.shape[-1]),
                         precision=jax.lax.Precision.HIGHEST)  # [E_total, T]
  out, start = [], 0
  for size in (sizes or (table.shape[0],)):
    weights, indices = cpu_kernel.top_k_softmax_et(logits_et[start:start + size], top_k, scale,
                                                   renormalize_eps)
    out.append(Routing(indices=indices.reshape(lead + (top_k,)),
                       weights=weights.reshape(lead + (top_k,))))
    start += size
  return out


def uniform_routing(shape: Sequence[int], num_experts: int) -> Routing:
  """Every token uses all experts with weight 1/E (K = E).

  Args:
    shape: the token dims ``[...]`` (e.g. ``x.shape[:-1]``).
    num_experts: E.

  Returns:
    Routing with indices [..., E] = arange(E) and weights [..., E] = 1/E, float32.
  """
  if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
    raise RoutingError(f"uniform_routing: num_experts must be a positive int, got {num_experts!r}")
  shape = tuple(int(s) for s in shape)
  indices = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), shape + (num_experts,))
  weights = jnp.full(shape + (num_experts,), 1.0 / num_experts, dtype=jnp.float32)
  return Routing(indices=indices, weights=weights)


def one_hot_routing(expert_index, shape: Sequence[int]) -> Routing:
  """Routes every token to a single expert with weight 1 (K = 1).

  Used by task-level oracle routing and Retrieval (one expert per example: pass ``[B, 1]``
  indices with ``shape=(B, L)``).

  Args:
    expert_index: an int or int array broadcastable to ``shape``.
    shape: the token dims ``[...]``.

  Returns:
    Routing with indices [..., 1] int32 and weights [..., 1] float32 ones.
  """
  shape = tuple(int(s) for s in shape)
  idx = jnp.asarray(expert_index)
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise RoutingError(f"one_hot_routing: expert_index must be integer, got dtype {idx.dtype}")
  try:
    idx = jnp.broadcast_to(idx.astype(jnp.int32), shape)
  except ValueError as e:
    raise RoutingError(
        f"one_hot_routing: expert_index shape {idx.shape} does not broadcast to {shape}") from e
  return Routing(indices=idx[..., None], weights=jnp.ones(shape + (1,), jnp.float32))
