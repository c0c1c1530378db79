"""One LoRA expert at a dense site: ``y = u @ W + scale * (u @ A) @ B``.

Letters: B batch, L tokens, D site input width, F site output width, R LoRA rank.

Conventions (PHATGOOSE, Muqeeth et al. ICML 2024, sec. 4 "experimental setup": LoRA of rank 16 on
every q, k, v, o, wi_0, wi_1, wo of T5.1.1 encoder and decoder), checked against the official code
r-three/phatgoose ``src/models/addons/peft.py`` (``FFNAdapter`` with ``non_linearity='identity'``,
``position='beside'``, ``divide_by_d_bottleneck=True``) and ``moe.py`` (``FFNExperts``):
  * ``lora_a`` [D, R] ~ N(0, 0.01^2) (``torch.randn(...) * 0.01``, ``init_scale=0.01``);
  * ``lora_b`` [R, F] = 0, so the adapted model equals the base model at initialisation;
  * the update is divided by the bottleneck R (``divide_by_d_bottleneck``): scale = 1/R.
There is no PEFT-style ``alpha``; an imported PEFT adapter sets ``scale = alpha / r`` instead.

Parameters: the base ``kernel`` [D, F] stays in ``params`` at the site's path (same path as the
plain model); ``lora_a``/``lora_b`` live in the ``adapters`` collection at the same path, with
logical axes ``(kernel_axes[0], 'lora_rank')`` and ``('lora_rank', kernel_axes[1])`` in
``adapters_axes``.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp

from phatgoose_jax.adapters import collect
from phatgoose_jax.models.layers import DenseSite

Array = jax.Array
ADAPTERS = "adapters"


def lora_delta(x: Array, lora_a: Array, lora_b: Array, scale: Any, dtype: Any) -> Array:
  """``scale * (x @ A) @ B`` in the compute ``dtype``.

  Args:
    x: [..., D] site input.
    lora_a: [D, R].
    lora_b: [R, F].
    scale: python float or scalar array.
    dtype: compute dtype of the matmuls and of the result.

  Returns:
    [..., F] in ``dtype``.
  """
  x = jnp.asarray(x, dtype)
  h = jnp.einsum("...d,dr->...r", x, jnp.asarray(lora_a, dtype))  # [..., R]
  y = jnp.einsum("...r,rf->...f", h, jnp.asarray(lora_b, dtype))  # [..., F]
  return y * jnp.asarray(scale, dtype)


def check_positive(value: Any, field: str, site: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"site {site!r}: {field} must be a positive int, got {value!r}")


class LoraSite(DenseSite):
  """Base projection plus one LoRA expert (expert training and single-expert evaluation).

  Attributes (beyond `DenseSite`):
    rank: R.
    scale: multiplier of the update; None means 1/R (PHATGOOSE ``divide_by_d_bottleneck``).
    init_std: standard deviation of ``lora_a`` at initialisation (0.01).
    collect_inputs: sow the per-example input mean (see `phatgoose_jax.adapters.collect`).
  """
  rank: int = 16
  scale: Optional[float] = None
  init_std: float = 0.01
  collect_inputs: bool = False

  @property
  def lora_scale(self) -> float:
    return 1.0 / self.rank if self.scale is None else float(self.scale)

  def lora_weights(self, dim_in: int):
    """Declares (or reads) ``lora_a`` [D, R] and ``lora_b`` [R, F] in ``adapters``."""
    check_positive(self.rank, "rank", self.site)
    kin, kout = self.kernel_axes
    a_init = nn.initializers.normal(stddev=self.init_std)
    lora_a = nn_partitioning.variable_with_axes(
        ADAPTERS, "lora_a",
        lambda: a_init(self.make_rng("params"), (dim_in, self.rank), self.param_dtype),
        axes=(kin, "lora_rank")).value
    lora_b = nn_partitioning.variable_with_axes(
        ADAPTERS, "lora_b", lambda: jnp.zeros((self.rank, self.features), self.param_dtype),
        axes=("lora_rank", kout)).value
    return lora_a, lora_b

  def delta(self, x: Array) -> Array:
    """The LoRA update ``scale * (x @ A) @ B`` [..., F] in the compute dtype."""
    lora_a, lora_b = self.lora_weights(x.shape[-1])
    return lora_delta(x, lora_a, lora_b, self.lora_scale, self.dtype)

  @nn.compact
  def __call__(self, x: Array, **site_inputs) -> Array:
    """x [..., D] -> [..., F]; ``site_inputs`` is only read for input-mean collection."""
    y = self.base_projection(x)  # base kernel first: same params init as the plain model
    if self.collect_inputs:
      collect.sow_site_input_mean(self, self.site, x, site_inputs)
    return y + self.delta(x)
