"""The ``Routing`` record: which experts each token uses, and with what weight.

Letters used in shape comments:
  T tokens (any number of leading dims, flattened), E experts, K experts kept per token.

A ``Routing`` is a ``NamedTuple`` and hence a JAX pytree: it passes through ``jax.jit``,
``jax.grad`` (gradients flow into ``weights``; ``indices`` are integers and carry none) and
``jax.tree_util`` unchanged.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class RoutingError(ValueError):
  """Bad input to a routing function; the message names the offending parameter."""


class Routing(NamedTuple):
  """Top-k routing decision for every token.

  Attributes:
    indices: [..., K] int32 expert ids (each in ``[0, E)``), best first for scored routers.
    weights: [..., K] float32 mixing weights; zero weight means the slot contributes nothing.
  """
  indices: jax.Array
  weights: jax.Array

  @property
  def top_k(self) -> int:
    """K, the number of experts kept per token."""
    return int(self.indices.shape[-1])

  @property
  def batch_shape(self) -> tuple:
    """The leading (token) dims ``[...]``."""
    return tuple(self.indices.shape[:-1])


def check_routing(routing: Routing, batch_shape: Sequence[int] | None = None,
                  where: str = "routing", num_experts: int | None = None) -> None:
  """Validates shapes and dtypes of a ``Routing``, and concrete indices against ``num_experts``.

  Args:
    routing: the record to check.
    batch_shape: expected leading dims ``[...]`` (e.g. ``x.shape[:-1]``), or None to skip.
    where: name used in error messages.
    num_experts: E; concrete (not traced) indices outside ``[0, E)`` are refused (the backends
      would otherwise disagree: some add nothing, some NaN, some wrap -1 to the last expert).
      Traced indices cannot be checked here.

  Raises:
    RoutingError: with a message naming ``where.indices`` / ``where.weights``.
  """
  if not isinstance(routing, Routing):
    raise RoutingError(f"{where}: expected a Routing(indices, weights), got {type(routing).__name__}")
  idx, w = routing.indices, routing.weights
  if idx.ndim < 1:
    raise RoutingError(f"{where}.indices must have a trailing K dim, got shape {tuple(idx.shape)}")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise RoutingError(f"{where}.indices must be an integer array, got dtype {idx.dtype}")
  if tuple(w.shape) != tuple(idx.shape):
    raise RoutingError(
        f"{where}.weights shape {tuple(w.shape)} must equal {where}.indices shape "
        f"{tuple(idx.shape)}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise RoutingError(f"{where}.weights must be floating point, got dtype {w.dtype}")
  if batch_shape is not None and tuple(idx.shape[:-1]) != tuple(batch_shape):
    raise RoutingError(
        f"{where}.indices leading dims {tuple(idx.shape[:-1])} must equal the token dims "
        f"{tuple(batch_shape)} of x")
  if num_experts is not None and not isinstance(idx, jax.core.Tracer) and idx.size:
    host = np.asarray(idx)  # concrete: plain numpy, so no tracing inside an outer jit
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= num_experts:
      raise RoutingError(f"{where}.indices must be in [0, num_experts={num_experts}), got values "
                         f"in [{lo}, {hi}]")


def check_top_k(top_k: int, num_experts: int, where: str = "top_k") -> int:
  """Returns ``top_k`` as an int after checking ``1 <= top_k <= num_experts``."""
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
    raise RoutingError(f"{where} must be a python int, got {top_k!r}")
  if not 1 <= int(top_k) <= int(num_experts):
    raise RoutingError(f"{where}={top_k} must be in [1, num_experts={num_experts}]")
  return int(top_k)
