"""A routed library of LoRA experts at one dense site (PHATGOOSE inference and its baselines).

Letters: B batch, L tokens of the site input, D site input width, F site output width, E experts,
K experts kept per token, R LoRA rank.

``y_t = u_t @ W + sum_k w_tk * scale[e_tk] * (u_t @ A[e_tk]) @ B[e_tk]`` for every token ``t``
of the site input ``u`` (Muqeeth et al., ICML 2024, sec. 3: tokenwise top-k routing at every
site). The module owns the parameters; the routing decision and the routed product are the
pure functions of `phatgoose_jax.routing`. Each site routes the tokens it sees: encoder sites and
cross-attention key/value route encoder tokens (once per sequence when `init_cache` fills the cache,
since the model caches the projected keys/values), decoder self-attention, FFN and
cross-attention query/out route decoder tokens (one new token per cached decoding step).

Variables in ``adapters`` at the site path (filled from an expert library; init values only give
shapes): ``lora_a`` [E, D, R], ``lora_b`` [E, R, F], ``gates`` [E, D] (router vectors: PHATGOOSE
gates, Average Activation or Arrow prototypes) and ``scale`` [E].

Routers (``router``):
  * ``'phatgoose'``, ``'average_activation'``: `routing.phatgoose_route` with ``gates``
    (standardised scaled dot product, softmax over E, top-k, renormalised as the official code);
  * ``'arrow'``: `routing.arrow_route` (Ostapenko et al. 2024), ``gates`` = Arrow prototypes;
  * ``'arrow_phatgoose'``: the Arrow variant PHATGOOSE ran as its baseline (``variant=
    'phatgoose_baseline'``);
  * ``'uniform'``: every expert with weight 1/E (K = E);
  * ``'example_weights'``: ``site_inputs['expert_weights']`` [B, E] applied to every token of each
    example (K = E; one-hot = Retrieval/oracle routing, uniform = output averaging).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp

from phatgoose_jax import routing as rt
from phatgoose_jax.adapters import collect
from phatgoose_jax.adapters.lora import ADAPTERS, check_positive
from phatgoose_jax.models.layers import DenseSite

Array = jax.Array

ROUTERS = ("phatgoose", "average_activation", "arrow", "arrow_phatgoose", "uniform",
           "example_weights")
TOP_K_ROUTERS = ("phatgoose", "average_activation", "arrow", "arrow_phatgoose")


def example_weights_routing(expert_weights: Any, token_shape: tuple, num_experts: int,
                            site: str = "") -> rt.Routing:
  """Per-example weights [B, E] broadcast to every token: Routing with K = E.

  Args:
    expert_weights: [B, E] mixing weights of each example (used as given).
    token_shape: the site input's token dims (B, ...).
    num_experts: E.
    site: for error messages.

  Returns:
    Routing with indices [B, ..., E] = arange(E) and weights [B, ..., E] float32.
  """
  w = jnp.asarray(expert_weights)
  batch = token_shape[0]
  if w.ndim != 2 or w.shape != (batch, num_experts):
    raise ValueError(
        f"site {site!r}: site_inputs['expert_weights'] must be [B={batch}, E={num_experts}], "
        f"got shape {tuple(w.shape)}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    w = w.astype(jnp.float32)
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  w = w.reshape((batch,) + (1,) * (len(token_shape) - 1) + (num_experts,))
  weights = jnp.broadcast_to(w, tuple(token_shape) + (num_experts,))
  indices = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), weights.shape)
  return rt.Routing(indices=indices, weights=weights)


class RoutedLoraSite(DenseSite):
  """Base projection plus a routed library of E LoRA experts.

  Attributes (beyond `DenseSite`):
    num_experts: E (shapes at init; the library's arrays replace them).
    rank: R.
    scale: initial value of every entry of ``scale`` [E]; None means 1/R.
    init_std: std of ``lora_a`` at init.
    top_k: K for the top-k routers.
    router: one of ``ROUTERS``.
    backend: `routing.routed_lora` backend.
    arrow_temperature: Arrow temperature; None picks the variant's default (1 for 'arrow', 10 for
      'arrow_phatgoose', as the official code).
    trace: sow ``routing`` = (indices [B, L, K], weights [B, L, K]) into ``intermediates``.
    collect_inputs: sow ``site_input_mean`` (see `phatgoose_jax.adapters.collect`).
  """
  num_experts: int = 1
  rank: int = 16
  scale: Optional[float] = None
  init_std: float = 0.01
  top_k: int = 2
  router: str = "phatgoose"
  backend: str = "auto"
  arrow_temperature: Optional[float] = None
  trace: bool = False
  collect_inputs: bool = False

  def library(self, dim_in: int):
    """Declares (or reads) the stacked ``lora_a``, ``lora_b``, ``gates``, ``scale``."""
    check_positive(self.num_experts, "num_experts", self.site)
    check_positive(self.rank, "rank", self.site)
    e, r, f = self.num_experts, self.rank, self.features
    kin, kout = self.kernel_axes
    pd = self.param_dtype
    a_init = nn.initializers.normal(stddev=self.init_std)
    lora_a = nn_partitioning.variable_with_axes(
        ADAPTERS, "lora_a", lambda: a_init(self.make_rng("params"), (e, dim_in, r), pd),
        axes=("expert", kin, "lora_rank")).value
    lora_b = nn_partitioning.variable_with_axes(
        ADAPTERS, "lora_b", lambda: jnp.zeros((e, r, f), pd),
        axes=("expert", "lora_rank", kout)).value
    gates = nn_partitioning.variable_with_axes(
        ADAPTERS, "gates", lambda: jnp.zeros((e, dim_in), pd), axes=("expert", kin)).value
    init_scale = 1.0 / r if self.scale is None else float(self.scale)
    scale = nn_partitioning.variable_with_axes(
        ADAPTERS, "scale", lambda: jnp.full((e,), init_scale, pd), axes=("expert",)).value
    if lora_a.ndim != 3 or lora_a.shape[1] != dim_in:
      raise ValueError(f"site {self.site!r}: adapters lora_a must be [E, D={dim_in}, R], got "
                       f"{tuple(lora_a.shape)}")
    num = lora_a.shape[0]
    if lora_b.shape[:2] != (num, lora_a.shape[2]) or lora_b.shape[2] != f:
      raise ValueError(f"site {self.site!r}: adapters lora_b must be [E={num}, "
                       f"R={lora_a.shape[2]}, F={f}], got {tuple(lora_b.shape)}")
    if gates.shape != (num, dim_in):
      raise ValueError(f"site {self.site!r}: adapters gates must be [E={num}, D={dim_in}], got "
                       f"{tuple(gates.shape)}")
    if scale.shape != (num,):
      raise ValueError(f"site {self.site!r}: adapters scale must be [E={num}], got "
                       f"{tuple(scale.shape)}")
    return lora_a, lora_b, gates, scale

  def route(self, x: Array, gates: Array, site_inputs: Mapping[str, Any]) -> rt.Routing:
    """The routing of every token of ``x`` [B, ..., D] (float32 weights, [B, ..., K])."""
    num = gates.shape[0]
    if self.router in TOP_K_ROUTERS and self.top_k > num:
      raise ValueError(f"site {self.site!r}: AdapterConfig.top_k={self.top_k} exceeds the "
                       f"{num} experts of the library at this site")
    if self.router in ("phatgoose", "average_activation"):
      return rt.phatgoose_route(x, gates, self.top_k)
    if self.router == "arrow":
      return rt.arrow_route(x, gates, self.top_k, temperature=self.arrow_temperature,
                            variant="arrow")
    if self.router == "arrow_phatgoose":
      return rt.arrow_route(x, gates, self.top_k, temperature=self.arrow_temperature,
                            variant="phatgoose_baseline")
    if self.router == "uniform":
      return rt.uniform_routing(x.shape[:-1], num)
    if self.router == "example_weights":
      weights = site_inputs.get("expert_weights")
      if weights is None:
        if self.is_initializing():  # shapes only: any valid weights do
          weights = jnp.full((x.shape[0], num), 1.0 / num, jnp.float32)
        else:
          raise ValueError(f"site {self.site!r}: router 'example_weights' needs "
                           "site_inputs['expert_weights'] [B, E]")
      return example_weights_routing(weights, tuple(x.shape[:-1]), num, self.site)
    raise ValueError(f"site {self.site!r}: AdapterConfig.router must be one of {ROUTERS}, got "
                     f"{self.router!r}")

  @nn.compact
  def __call__(self, x: Array, **site_inputs) -> Array:
    """x [B, ..., D] -> [B, ..., F]."""
    y = self.base_projection(x)  # [..., F]
    if self.collect_inputs:
      collect.sow_site_input_mean(self, self.site, x, site_inputs)
    lora_a, lora_b, gates, scale = self.library(x.shape[-1])
    with jax.named_scope("router"):
      routing = self.route(x, gates, site_inputs)  # [..., K]
    if self.trace:
      self.sow("intermediates", "routing", (routing.indices, routing.weights))
    with jax.named_scope("routed_lora"):
      # y + delta; the 'cpu_kernel' backend accumulates into y's buffer (no extra pass).
      return rt.routed_lora(jnp.asarray(x, self.dtype), lora_a, lora_b, routing, scale,
                            backend=self.backend, add_to=y).astype(self.dtype)  # [..., F]
