"""Arrow routing (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library
of LoRAs", Section 4 "Arrow"), and the variant PHATGOOSE ran as its Arrow baseline.

Letters used in shape comments:
  T tokens (any leading dims ``[...]``), D site input, F site output, E experts, K top-k,
  R LoRA rank.

A LoRA expert maps a row vector ``x [D]`` to ``x @ A @ B``; its update is ``dW = A B`` of shape
[D, F]. Arrow's prototype of an expert is the direction in the INPUT space that ``dW`` amplifies
most: the top left-singular vector of ``dW [D, F]`` (equivalently the top right-singular vector of
``dW^T [F, D]``). Its sign is arbitrary; Arrow scores with ``|x . p|`` so the sign never matters.
We nevertheless fix it (largest-magnitude entry positive) so results are reproducible.

PHATGOOSE's Arrow baseline (r-three/phatgoose): ``scripts/manipulations.py``
(``create_router_embeddings_from_weights``, ``method_type="top1_eigen_weighted_vector"``) stores
``U[:, 0]`` of ``torch.svd(layer1 @ layer2)`` as the expert embedding (the same prototype), and
``Router`` with ``score_type="arrow"`` (``src/models/addons/moe.py``) scores the RAW hidden state
(no layer norm): ``|x . p / temperature| * sqrt(1/D)`` with ``temperature=10`` (Router default),
softmax over all E, then ``FFNExperts`` keeps the top-k renormalised by ``sum + 1e-6``.
Since a softmax over all E restricted to the kept k and renormalised IS a softmax over the kept
k, that baseline equals plain Arrow at temperature ``10 * sqrt(D)``, except that its weights sum
to ``s / (s + 1e-6)`` (s = kept softmax mass) instead of exactly 1.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from phatgoose_jax.routing.scores import PHATGOOSE_TOPK_EPS, top_k_routing
from phatgoose_jax.routing.topk import top_k as _top_k
from phatgoose_jax.routing.types import Routing, RoutingError, check_top_k

ARROW_VARIANTS = ("arrow", "phatgoose_baseline")
# Router.temperature default in the official code, used by its score_type="arrow".
PHATGOOSE_ARROW_TEMPERATURE = 10.0


def _check_lora_pair(lora_a: jax.Array, lora_b: jax.Array, where: str) -> None:
  if lora_a.ndim != 3 or lora_b.ndim != 3:
    raise RoutingError(
        f"{where}: lora_a must be [E, D, R] and lora_b [E, R, F], got {lora_a.shape} and "
        f"{lora_b.shape}")
  if lora_a.shape[0] != lora_b.shape[0] or lora_a.shape[2] != lora_b.shape[1]:
    raise RoutingError(
        f"{where}: lora_a {lora_a.shape} and lora_b {lora_b.shape} disagree on E or R")


def _fix_sign(p: jax.Array) -> jax.Array:
  """Flips each row of ``p [E, D]`` so that its largest-magnitude entry is positive."""
  pivot = jnp.take_along_axis(p, jnp.argmax(jnp.abs(p), axis=-1)[:, None], axis=-1)  # [E, 1]
  return p * jnp.where(pivot < 0, -1.0, 1.0).astype(p.dtype)


def arrow_prototypes(lora_a: jax.Array, lora_b: jax.Array, method: str = "qr") -> jax.Array:
  """Per-expert top input-space singular direction of ``dW = A @ B``.

  Args:
    lora_a: [E, D, R] LoRA down-projections.
    lora_b: [E, R, F] LoRA up-projections.
    method: ``"qr"`` (default) never forms the [D, F] matrix: ``A = Qa Ra``, ``B^T = Qb Rb``,
      so ``dW = Qa (Ra Rb^T) Qb^T`` and the top left-singular vector is ``Qa u`` with ``u`` the
      top left-singular vector of the small [R, R] core. ``"explicit"`` forms ``dW`` and takes
      its SVD (reference path, O(D F min(D, F)) per expert).

  Returns:
    [E, D] unit-norm prototypes, float32 (float64 for float64 input), sign fixed so the
    largest-magnitude entry is positive. An all-zero expert gives an arbitrary unit vector.
  """
  lora_a = jnp.asarray(lora_a)
  lora_b = jnp.asarray(lora_b)
  _check_lora_pair(lora_a, lora_b, "arrow_prototypes")
  dtype = jnp.promote_types(jnp.result_type(lora_a, lora_b), jnp.float32)
  a = lora_a.astype(dtype)
  b = lora_b.astype(dtype)
  hp = jax.lax.Precision.HIGHEST
  if method == "explicit":
    delta_w = jnp.einsum("edr,erf->edf", a, b, precision=hp)  # [E, D, F]
    u, _, _ = jnp.linalg.svd(delta_w, full_matrices=False)  # u: [E, D, min(D, F)]
    protos = u[..., 0]
  elif method == "qr":
    q_a, r_a = jnp.linalg.qr(a)  # [E, D, R'], [E, R', R]
    q_b, r_b = jnp.linalg.qr(jnp.swapaxes(b, 1, 2))  # [E, F, R''], [E, R'', R]
    core = jnp.einsum("eir,ejr->eij", r_a, r_b, precision=hp)  # [E, R', R''] = Ra Rb^T
    u_core, _, _ = jnp.linalg.svd(core, full_matrices=False)  # [E, R', min]
    protos = jnp.einsum("edi,ei->ed", q_a, u_core[..., 0], precision=hp)  # [E, D]
  else:
    raise RoutingError(f"arrow_prototypes: method must be 'qr' or 'explicit', got {method!r}")
  return _fix_sign(protos)


def arrow_route(x: jax.Array, prototypes: jax.Array, top_k: int,
                temperature: Optional[float] = None, variant: str = "arrow",
                renormalize_eps: Optional[float] = PHATGOOSE_TOPK_EPS) -> Routing:
  """Arrow token routing.

  ``variant="arrow"`` (Ostapenko et al. 2024): ``logits = |x . p_e| / temperature`` (temperature
  default 1.0), keep the top-k logits, softmax over the kept k only (weights sum to exactly 1).

  ``variant="phatgoose_baseline"`` (r-three/phatgoose ``Router(score_type="arrow")``):
  ``logits = |x . p_e / temperature| * D^-1/2`` (temperature default 10), softmax over ALL E,
  keep top-k, divide by ``sum + renormalize_eps`` (1e-6, as PHATGOOSE's top-k).

  No normalisation of ``x`` in either variant. Math in float32.

  Args:
    x: [..., D] site inputs.
    prototypes: [E, D] from ``arrow_prototypes``.
    top_k: K.
    temperature: divides the logits; None picks the variant's default (1.0 or 10.0).
    variant: ``"arrow"`` or ``"phatgoose_baseline"``.
    renormalize_eps: only for ``"phatgoose_baseline"``; see ``top_k_routing``.

  Returns:
    Routing with indices [..., K] int32 and weights [..., K] float32.
  """
  if variant not in ARROW_VARIANTS:
    raise RoutingError(f"arrow_route: variant must be one of {ARROW_VARIANTS}, got {variant!r}")
  x = jnp.asarray(x)
  prototypes = jnp.asarray(prototypes)
  if prototypes.ndim != 2 or x.ndim < 1 or x.shape[-1] != prototypes.shape[-1]:
    raise RoutingError(
        f"arrow_route: need x [..., D] and prototypes [E, D], got {x.shape} and "
        f"{prototypes.shape}")
  if temperature is None:
    temperature = 1.0 if variant == "arrow" else PHATGOOSE_ARROW_TEMPERATURE
  if not temperature > 0:
    raise RoutingError(f"arrow_route: temperature must be > 0, got {temperature}")
  k = check_top_k(top_k, prototypes.shape[0], "arrow_route: top_k")
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  dots = jnp.einsum("...d,ed->...e", x.astype(dtype), prototypes.astype(dtype),
                    precision=jax.lax.Precision.HIGHEST)  # [..., E]
  if variant == "phatgoose_baseline":
    logits = jnp.abs(dots / temperature) * math.sqrt(1.0 / x.shape[-1])
    return top_k_routing(logits, k, renormalize_eps=renormalize_eps)
  logits = jnp.abs(dots) / temperature  # [..., E]
  top_logits, indices = _top_k(logits, k)  # [..., K] (== lax.top_k)
  return Routing(indices=indices.astype(jnp.int32), weights=jax.nn.softmax(top_logits, axis=-1))
