"""Building blocks of the T5.1.1 network with t5x's parameter names and logical axes.

Every parameter is created through `flax.linen.partitioning.param_with_axes`, so a `params_axes`
collection is returned beside `params` (the collection t5x's partitioner reads and validates).

The one injection point of the package lives here: every dense projection of the network (attention
q/k/v/o, cross-attention q/k/v/o, FFN wi_0/wi_1/wo) is built by a *site factory* that receives the site's
name (e.g. ``decoder/layers_3/encoder_decoder_attention/key``). The default factory, `dense_site`, builds a
plain kernel; `phatgoose_jax.adapters` provides factories that add LoRA experts, gates or a routed library
in the separate ``adapters`` variable collection, leaving the base ``params`` tree untouched.

Letters: B batch, L length, D site input width, F site output width, H heads, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import numpy as np

param_with_axes = nn_partitioning.param_with_axes
Array = jax.Array
Initializer = Callable[..., Array]

# t5x's initialisers for the T5.1.1 network (t5x/examples/t5/network.py).
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# t5x's MultiHeadDotProductAttention draws q/k/v/out from a plain normal (the MLP and logits
# from a truncated one).
attention_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
default_embed_init = nn.initializers.normal(stddev=1.0)
default_relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def site_name(module: nn.Module, name: str) -> str:
  """The '/'-joined parameter path of a child ``name`` of ``module`` (its LoRA site name)."""
  return "/".join(tuple(module.path) + (name,))


def logical_constraint(x: Array, axes: Sequence[Optional[str]]) -> Array:
  """`nn.with_logical_constraint` that is a no-op outside a mesh (CPU tests, plain apply)."""
  return nn.with_logical_constraint(x, tuple(axes))


class DenseSite(nn.Module):
  """A bias-free dense projection ``x @ kernel`` with t5x's param name ``kernel`` [D, F].

  This is the base layer of every site. Adapter site modules reuse it (as an explicit, unnamed-param
  submodule is not possible in linen without changing the path) by subclassing and calling
  `base_projection`.

  Attributes:
    features: F, the output width.
    kernel_axes: logical axis names of the kernel, e.g. ('embed', 'joined_kv').
    site: the site name (for adapters and routing traces).
  """
  features: int
  kernel_axes: Tuple[str, str]
  site: str = ""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = default_kernel_init

  def base_projection(self, x: Array) -> Array:
    """x [..., D] -> [..., F] through the base kernel, in the compute dtype."""
    kernel = param_with_axes("kernel", self.kernel_init, (x.shape[-1], self.features),
                             self.param_dtype, axes=self.kernel_axes)
    x = jnp.asarray(x, self.dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    return jnp.einsum("...d,df->...f", x, kernel)

  @nn.compact
  def __call__(self, x: Array, **unused_site_kwargs) -> Array:
    return self.base_projection(x)


@dataclasses.dataclass(frozen=True)
class SiteSpec:
  """What the network tells a site factory about one dense projection."""
  site: str                      # e.g. 'encoder/layers_0/attention/query'
  features: int                  # F
  kernel_axes: Tuple[str, str]   # logical axes of the [D, F] kernel
  dtype: Any
  param_dtype: Any
  kernel_init: Initializer


def dense_site(spec: SiteSpec, name: str) -> nn.Module:
  """The default site factory: a plain base projection (no adapter)."""
  return DenseSite(features=spec.features, kernel_axes=spec.kernel_axes, site=spec.site,
                   dtype=spec.dtype, param_dtype=spec.param_dtype,
                   kernel_init=spec.kernel_init, name=name)


SiteFactory = Callable[[SiteSpec, str], nn.Module]


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias, statistics in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * jax.lax.rsqrt(mean2 + self.epsilon), self.dtype)
    scale = param_with_axes("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype,
                            axes=("embed",))
    return y * jnp.asarray(scale, self.dtype)


class Embed(nn.Module):
  """Token embedding ``embedding`` [V, D] (axes vocab, embed), with `attend` for tied logits."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Initializer = default_embed_init

  def setup(self):
    self.embedding = param_with_axes("embedding", self.embedding_init,
                                     (self.num_embeddings, self.features), self.param_dtype,
                                     axes=("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"Embed expects integer token ids, got dtype {tokens.dtype}")
    # An id outside [0, V) embeds to zeros, as t5x's one-hot lookup (a plain gather gives NaN).
    return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0, mode="fill",
                    fill_value=0)

  def attend(self, query: Array) -> Array:
    """Tied logits in float32 whatever the compute dtype (t5x ``attend_dtype=jnp.float32``)."""
    return jnp.einsum("...d,vd->...v", jnp.asarray(query, jnp.float32),
                      jnp.asarray(self.embedding, jnp.float32))


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucketing of key_position - query_position (Raffel et al. 2020, sec. 2.1).

  Half the buckets are exact small distances, the rest logarithmically spaced up to
  ``max_distance``; beyond it, the last bucket. Bidirectional splits buckets by sign.
  """
  ret = np.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) /
      np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """Learned relative position bias ``rel_embedding`` [H, buckets], shared by a stack's layers."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Initializer = default_relpos_init

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True) -> Array:
    """Returns the bias [1, H, qlen, klen]."""
    context = np.arange(qlen, dtype=np.int32)[:, None]
    memory = np.arange(klen, dtype=np.int32)[None, :]
    buckets = relative_position_bucket(memory - context, bidirectional, self.num_buckets,
                                       self.max_distance)  # [qlen, klen]
    table = param_with_axes("rel_embedding", self.embedding_init,
                            (self.num_heads, self.num_buckets), self.param_dtype,
                            axes=("heads", "relpos_buckets"))
    table = jnp.asarray(table, self.dtype)
    values = jnp.take(table, jnp.asarray(buckets), axis=1)  # [heads, qlen, klen]
    return values[None]


_ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=True),  # t5x: flax gelu, tanh form
    "gelu_exact": functools.partial(nn.gelu, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[Array], Array]:
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"T5Config.mlp_activations: unknown activation {name!r}; "
                     f"choose from {sorted(_ACTIVATIONS)}") from None
