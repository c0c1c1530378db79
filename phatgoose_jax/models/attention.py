"""Multi-head dot-product attention of T5.1.1 with t5x's names and an incremental-decoding cache.

The four projections (``query``, ``key``, ``value``, ``out``) are sites built by the site factory; the
kernels are the t5x shapes: q/k/v [D, H*Dh] with axes (embed, joined_kv), out [H*Dh, D] with axes
(joined_kv, embed). As in t5x, no 1/sqrt(Dh) is applied at run time: it is folded into the
initialiser of ``query``.

Cache (collection ``cache``): self-attention keeps ``cached_key``/``cached_value`` [B, Lmax, H, Dh] and
``cache_index``; cross-attention keeps the projected encoder keys/values once per sequence, so routed
cross-attention k/v (routed on encoder tokens) are computed a single time during decoding.

Letters: B batch, Q query length, K key length, H heads, Dh head dim (``d`` in einsums).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from phatgoose_jax.models import layers

Array = jax.Array


def make_attention_mask(query_input: Array, key_input: Array, dtype=jnp.float32) -> Array:
  """[B, Q] x [B, K] -> mask [B, 1, Q, K] (1 = attend)."""
  mask = jnp.logical_and(query_input[..., :, None], key_input[..., None, :])
  return mask[:, None].astype(dtype)


def make_causal_mask(x: Array, dtype=jnp.float32) -> Array:
  """[B, L] -> lower-triangular mask [B, 1, L, L]."""
  idx = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return (idx[..., :, None] >= idx[..., None, :])[:, None].astype(dtype)


def combine_masks(*masks: Optional[Array], dtype=jnp.float32) -> Optional[Array]:
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  mask = masks[0]
  for other in masks[1:]:
    mask = jnp.logical_and(mask, other)
  return mask.astype(dtype)


def mask_to_bias(mask: Optional[Array], dtype) -> Optional[Array]:
  """t5x: masked positions get an additive -1e10."""
  if mask is None:
    return None
  return jax.lax.select(mask > 0, jnp.zeros(mask.shape, dtype), jnp.full(mask.shape, -1e10, dtype))


def combine_biases(*biases: Optional[Array]) -> Optional[Array]:
  biases = [b for b in biases if b is not None]
  if not biases:
    return None
  out = biases[0]
  for b in biases[1:]:
    out = out + b
  return out


class MultiHeadAttention(nn.Module):
  """T5 attention whose projections are sites.

  Attributes:
    num_heads: H.
    head_dim: Dh.
    site_factory: builds each projection from a `layers.SiteSpec`.
    dropout_rate: dropout on the attention weights.
    float32_logits: softmax in float32.
  """
  num_heads: int
  head_dim: int
  site_factory: layers.SiteFactory = layers.dense_site
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = False
  kernel_init: Callable = layers.attention_kernel_init

  def _site(self, name: str, features: int, kernel_axes, kernel_init):
    spec = layers.SiteSpec(site=layers.site_name(self, name), features=features,
                           kernel_axes=kernel_axes, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=kernel_init)
    return self.site_factory(spec, name)

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array] = None,
               bias: Optional[Array] = None, *, enable_dropout: bool = False,
               decode: bool = False, cross: bool = False, cache_cross: bool = False,
               site_inputs: Optional[dict] = None) -> Array:
    """Args:
      inputs_q: [B, Q, D] query-side inputs.
      inputs_kv: [B, K, D] key/value-side inputs (== inputs_q for self-attention).
      mask: [B, 1, Q, K] attention mask (1 = attend) or None.
      bias: [1 or B, H, Q, K] additive bias (relative positions) or None.
      decode: incremental decoding; self-attention then expects Q == 1 once the cache exists.
      cross: this is cross-attention.
      cache_cross: (cross, decode) store the projected encoder keys/values in the ``cache``
        collection on this call; later decode calls that find them reuse them. Only
        `decoding.init_cache` asks for it (with the real encoder output). Without it, as in t5x
        (whose cache is initialised on dummy all-ones inputs), every step projects the
        ``encoded`` it is given.
      site_inputs: per-example extras forwarded to every site (e.g. task ids for task routing).

    Returns:
      [B, Q, D].
    """
    site_inputs = site_inputs or {}
    joined = self.num_heads * self.head_dim
    depth_scaling = jnp.sqrt(self.head_dim).astype(self.param_dtype)
    query_init = lambda *a: self.kernel_init(*a) / depth_scaling  # t5x folds 1/sqrt(Dh) here.
    q_site = self._site("query", joined, ("embed", "joined_kv"), query_init)
    k_site = self._site("key", joined, ("embed", "joined_kv"), self.kernel_init)
    v_site = self._site("value", joined, ("embed", "joined_kv"), self.kernel_init)
    o_site = self._site("out", inputs_q.shape[-1], ("joined_kv", "embed"), self.kernel_init)

    batch = inputs_q.shape[0]
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, self.head_dim))

    query = split(q_site(inputs_q, **site_inputs))  # [B, Q, H, Dh]

    if cross and decode and self.has_variable("cache", "cached_key") and not cache_cross:
      # Projected once per sequence by `decoding.init_cache`; steps read the cache.
      key = self.get_variable("cache", "cached_key")
      value = self.get_variable("cache", "cached_value")
    elif cross and decode and cache_cross:
      key = split(k_site(inputs_kv, **site_inputs))
      value = split(v_site(inputs_kv, **site_inputs))
      self.put_variable("cache", "cached_key", key)
      self.put_variable("cache", "cached_value", value)
    else:
      key = split(k_site(inputs_kv, **site_inputs))    # [B, K, H, Dh]
      value = split(v_site(inputs_kv, **site_inputs))  # [B, K, H, Dh]

    query = layers.logical_constraint(query, ("batch", "length", "heads", "kv"))
    key = layers.logical_constraint(key, ("batch", "length", "heads", "kv"))
    value = layers.logical_constraint(value, ("batch", "length", "heads", "kv"))

    if decode and not cross:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        max_length = cached_key.value.shape[1]
        if query.shape[1] != 1:
          raise ValueError("incremental decoding expects one token per step, got query length "
                           f"{query.shape[1]}")
        cur = cache_index.value
        one_hot = jax.nn.one_hot(cur, max_length, dtype=key.dtype)  # [Lmax]
        cached_key.value = cached_key.value + one_hot[None, :, None, None] * key
        cached_value.value = cached_value.value + one_hot[None, :, None, None] * value
        key, value = cached_key.value, cached_value.value
        cache_index.value = cur + 1
        # Attend only to the filled part of the cache (t5x: arange(length) <= cur_index).
        valid = (jnp.arange(max_length) <= cur)[None, None, None, :]
        mask = combine_masks(mask, jnp.broadcast_to(valid, (batch, 1, 1, max_length)))
        if bias is not None:
          bias = jax.lax.dynamic_slice_in_dim(bias, cur, 1, axis=-2)  # [1, H, 1, Lmax]

    attn_bias = combine_biases(mask_to_bias(mask, self.dtype), bias)

    with jax.named_scope("attention_weights"):
      if self.float32_logits:
        query, key = query.astype(jnp.float32), key.astype(jnp.float32)
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [B, H, Q, K]
      if attn_bias is not None:
        logits = logits + attn_bias.astype(logits.dtype)
      weights = jax.nn.softmax(logits).astype(self.dtype)
      if enable_dropout and self.dropout_rate > 0.0:
        # As t5x (broadcast_dropout=True): one mask shared across query positions.
        shape = weights.shape[:2] + (1,) + weights.shape[3:]
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, shape)
        weights = weights * keep.astype(weights.dtype) / jnp.asarray(1.0 - self.dropout_rate,
                                                                     weights.dtype)
      context = jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(self.dtype))  # [B, Q, H, Dh]
    context = context.reshape(context.shape[:2] + (joined,))  # [B, Q, H*Dh]
    out = o_site(context, **site_inputs)
    return layers.logical_constraint(out, ("batch", "length", "embed"))
