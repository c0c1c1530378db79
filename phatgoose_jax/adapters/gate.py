"""A LoRA expert with a PHATGOOSE sigmoid gate (the gate-training stage).

Letters: B batch, L tokens, D site input width, F site output width, R LoRA rank.

PHATGOOSE (Muqeeth et al., ICML 2024, sec. 3): after an expert is trained, it is frozen and a gate
vector ``v`` [D] is trained per site on the same data, so that the site computes

  ``y_t = u_t @ W + sigmoid(u_t . v) * scale * (u_t @ A) @ B``   for every token t,

where ``u_t`` is the site input. The gate is zero-initialised (``expert_input_gate =
torch.zeros(d_in)`` in r-three/phatgoose ``src/models/addons/moe.py``, ``FFNExperts`` with
``learn_input_gate='only_sigmoid'``), so training starts at ``sigmoid(0) = 1/2``. The official code
multiplies the input by the gate before the LoRA (``(g u) A B``), which equals ``g (u A B)``
since the LoRA is linear; we gate the LoRA output. Per this package's convention, the dot product
and the sigmoid are in float32 (the official code uses the hidden-state dtype); the product with
the update is then cast to the compute dtype.

Parameters: ``kernel`` in ``params``; ``lora_a``, ``lora_b`` (as `LoraSite`) and ``gate`` [D] (axes
``(kernel_axes[0],)``) in ``adapters``.
"""
from __future__ import annotations

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp

from phatgoose_jax.adapters import collect
from phatgoose_jax.adapters.lora import ADAPTERS, LoraSite

Array = jax.Array


def gate_probability(x: Array, gate: Array) -> Array:
  """``sigmoid(x . gate)`` per token in float32: x [..., D], gate [D] -> [..., 1]."""
  logits = jnp.einsum("...d,d->...", jnp.asarray(x, jnp.float32), jnp.asarray(gate, jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)  # [...]
  return jax.nn.sigmoid(logits)[..., None]


class GatedLoraSite(LoraSite):
  """`LoraSite` whose update is scaled per token by the PHATGOOSE gate ``sigmoid(u . gate)``."""

  def gate_vector(self, dim_in: int) -> Array:
    """Declares (or reads) ``gate`` [D] (zero-init) in ``adapters``."""
    return nn_partitioning.variable_with_axes(
        ADAPTERS, "gate", lambda: jnp.zeros((dim_in,), self.param_dtype),
        axes=(self.kernel_axes[0],)).value

  @nn.compact
  def __call__(self, x: Array, **site_inputs) -> Array:
    """x [..., D] -> [..., F]."""
    y = self.base_projection(x)
    if self.collect_inputs:
      collect.sow_site_input_mean(self, self.site, x, site_inputs)
    delta = self.delta(x)  # [..., F] compute dtype
    with jax.named_scope("gate"):
      prob = gate_probability(x, self.gate_vector(x.shape[-1]))  # [..., 1] float32
    return y + prob.astype(self.dtype) * delta
