"""T5.1.1 encoder-decoder (`Transformer`) with t5x's parameter tree, call signature and methods.

Parameter paths are those of ``t5x.examples.t5.network.Transformer`` (``token_embedder/embedding``,
``encoder/layers_0/attention/query/kernel``, ``decoder/layers_0/encoder_decoder_attention/key/kernel``,
``decoder/logits_dense/kernel``, ...), so stock T5X checkpoints load unchanged and the module can stand
in as the ``module`` of t5x's ``EncoderDecoderModel``. Adapters never add to ``params``: they live in
the ``adapters`` collection built by the site factory (see `phatgoose_jax.adapters`).

Numerics as t5x: pre-norm residual blocks with RMS norms, gated-GELU FFN (tanh GELU), relative position
bias in each stack shared by its layers, no biases, untied float32 logits with no rescaling, masked
attention positions at -1e10, dropout with broadcast over the length axis.

Letters: B batch, L encoder length, T decoder length, D model width, V vocab.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from phatgoose_jax.models import attention as attn
from phatgoose_jax.models import layers
from phatgoose_jax.models.config import T5Config

Array = jax.Array


def _dropout(cfg: T5Config):
  return nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))


def _norm(cfg: T5Config, name: str) -> layers.RMSNorm:
  return layers.RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, cfg.params_dtype, name=name)


def _attention(cfg: T5Config, site_factory: layers.SiteFactory,
               name: str) -> attn.MultiHeadAttention:
  return attn.MultiHeadAttention(cfg.num_heads, cfg.head_dim, site_factory, cfg.compute_dtype,
                                 cfg.params_dtype, cfg.dropout_rate,
                                 cfg.float32_attention_logits, name=name)


class MlpBlock(nn.Module):
  """Gated FFN: wo( prod_i act_i(x @ wi_i) ); every kernel is a site."""
  config: T5Config
  site_factory: layers.SiteFactory = layers.dense_site

  def _site(self, name, features, axes):
    cfg = self.config
    spec = layers.SiteSpec(site=layers.site_name(self, name), features=features,
                           kernel_axes=axes, dtype=cfg.compute_dtype,
                           param_dtype=cfg.params_dtype, kernel_init=layers.default_kernel_init)
    return self.site_factory(spec, name)

  @nn.compact
  def __call__(self, x: Array, *, enable_dropout: bool = False,
               site_inputs: Optional[dict] = None) -> Array:
    cfg = self.config
    site_inputs = site_inputs or {}
    acts = cfg.mlp_activations
    hidden = []
    for i, act in enumerate(acts):
      name = f"wi_{i}" if len(acts) > 1 else "wi"
      h = self._site(name, cfg.mlp_dim, ("embed", "mlp"))(x, **site_inputs)  # [B, L, mlp]
      hidden.append(layers.activation(act)(h))
    h = hidden[0]
    for other in hidden[1:]:
      h = h * other
    h = _dropout(cfg)(h, deterministic=not enable_dropout)
    h = layers.logical_constraint(h, ("batch", "length", "mlp"))
    return self._site("wo", x.shape[-1], ("mlp", "embed"))(h, **site_inputs)


class EncoderLayer(nn.Module):
  config: T5Config
  relative_embedding: nn.Module
  site_factory: layers.SiteFactory = layers.dense_site

  @nn.compact
  def __call__(self, x, encoder_mask=None, *, enable_dropout=False, site_inputs=None):
    cfg = self.config
    length = x.shape[-2]
    bias = self.relative_embedding(length, length, True)  # [1, H, L, L]
    with jax.named_scope("self_attention"):
      h = _norm(cfg, "pre_attention_layer_norm")(x)
      h = _attention(cfg, self.site_factory, "attention")(
          h, h, encoder_mask, bias, enable_dropout=enable_dropout, site_inputs=site_inputs)
      x = x + _dropout(cfg)(h, deterministic=not enable_dropout)
    with jax.named_scope("mlp"):
      h = _norm(cfg, "pre_mlp_layer_norm")(x)
      h = MlpBlock(cfg, self.site_factory, name="mlp")(
          h, enable_dropout=enable_dropout, site_inputs=site_inputs)
      x = x + _dropout(cfg)(h, deterministic=not enable_dropout)
    return layers.logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: T5Config
  relative_embedding: nn.Module
  site_factory: layers.SiteFactory = layers.dense_site

  @nn.compact
  def __call__(self, x, encoded, decoder_mask=None, encoder_decoder_mask=None, *,
               enable_dropout=False, decode=False, max_decode_length=None, site_inputs=None,
               cache_cross_attention=False):
    cfg = self.config
    length = max_decode_length if decode and max_decode_length else x.shape[-2]
    bias = self.relative_embedding(length, length, False)  # [1, H, T, T]
    with jax.named_scope("self_attention"):
      h = _norm(cfg, "pre_self_attention_layer_norm")(x)
      h = _attention(cfg, self.site_factory, "self_attention")(
          h, h, decoder_mask, bias, enable_dropout=enable_dropout, decode=decode,
          site_inputs=site_inputs)
      x = x + _dropout(cfg)(h, deterministic=not enable_dropout)
    with jax.named_scope("cross_attention"):
      h = _norm(cfg, "pre_cross_attention_layer_norm")(x)
      h = _attention(cfg, self.site_factory, "encoder_decoder_attention")(
          h, encoded, encoder_decoder_mask, None, enable_dropout=enable_dropout, decode=decode,
          cross=True, cache_cross=cache_cross_attention, site_inputs=site_inputs)
      x = x + _dropout(cfg)(h, deterministic=not enable_dropout)
    with jax.named_scope("mlp"):
      h = _norm(cfg, "pre_mlp_layer_norm")(x)
      h = MlpBlock(cfg, self.site_factory, name="mlp")(
          h, enable_dropout=enable_dropout, site_inputs=site_inputs)
      x = x + _dropout(cfg)(h, deterministic=not enable_dropout)
    return layers.logical_constraint(x, ("batch", "length", "embed"))


def _relpos(cfg: T5Config, name: str) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance, cfg.num_heads,
                                       cfg.compute_dtype, cfg.params_dtype, name=name)


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module
  site_factory: layers.SiteFactory = layers.dense_site

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_mask=None, *, enable_dropout=False,
               site_inputs=None):
    cfg = self.config
    rel_emb = _relpos(cfg, "relpos_bias")
    x = self.shared_embedding(encoder_input_tokens.astype("int32"))  # [B, L, D]
    x = _dropout(cfg)(x, deterministic=not enable_dropout).astype(cfg.compute_dtype)
    for i in range(cfg.num_encoder_layers):
      with jax.named_scope(f"encoder_layer_{i}"):
        x = EncoderLayer(cfg, rel_emb, self.site_factory, name=f"layers_{i}")(
            x, encoder_mask, enable_dropout=enable_dropout, site_inputs=site_inputs)
    x = _norm(cfg, "encoder_norm")(x)
    # t5x: the encoder output's dropout is not broadcast over length (the others are).
    return nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=not enable_dropout)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module
  site_factory: layers.SiteFactory = layers.dense_site

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, decoder_positions=None, decoder_mask=None,
               encoder_decoder_mask=None, *, enable_dropout=False, decode=False,
               max_decode_length=None, site_inputs=None, cache_cross_attention=False):
    cfg = self.config
    rel_emb = _relpos(cfg, "relpos_bias")
    y = self.shared_embedding(decoder_input_tokens.astype("int32"))  # [B, T, D]
    y = _dropout(cfg)(y, deterministic=not enable_dropout).astype(cfg.compute_dtype)
    for i in range(cfg.num_decoder_layers):
      with jax.named_scope(f"decoder_layer_{i}"):
        y = DecoderLayer(cfg, rel_emb, self.site_factory, name=f"layers_{i}")(
            y, encoded, decoder_mask, encoder_decoder_mask, enable_dropout=enable_dropout,
            decode=decode, max_decode_length=max_decode_length, site_inputs=site_inputs,
            cache_cross_attention=cache_cross_attention)
    y = _norm(cfg, "decoder_norm")(y)
    y = _dropout(cfg)(y, deterministic=not enable_dropout)
    with jax.named_scope("logits"):
      if cfg.logits_via_embedding:
        logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1])
      else:
        # t5x computes the output projection in float32 whatever the compute dtype.
        logits = layers.DenseSite(cfg.vocab_size, ("embed", "vocab"), site="decoder/logits_dense",
                                  dtype=jnp.float32, param_dtype=cfg.params_dtype,
                                  name="logits_dense")(y)
    return layers.logical_constraint(logits, ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """T5.1.1 encoder-decoder.

  ``__call__(encoder_input_tokens [B, L], decoder_input_tokens [B, T], decoder_target_tokens [B, T],
  ...) -> logits [B, T, V]`` and the methods ``encode`` / ``decode`` follow t5x's signatures, so the
  module works under t5x's ``EncoderDecoderModel`` (teacher forcing, scoring, cached decoding).

  Attributes:
    config: a `T5Config`.
    site_factory: builds every dense projection from its `layers.SiteSpec` (default: plain kernel).
  """
  config: T5Config
  site_factory: layers.SiteFactory = layers.dense_site

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.compute_dtype,
                                       cfg.params_dtype)
    self.encoder = Encoder(cfg, self.token_embedder, self.site_factory)
    self.decoder = Decoder(cfg, self.token_embedder, self.site_factory)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             enable_dropout: bool = True, site_inputs: Optional[dict] = None) -> Array:
    """encoder_input_tokens [B, L] (0 = pad) -> encoded [B, L, D] (after ``encoder_norm``)."""
    cfg = self.config
    mask = attn.make_attention_mask(encoder_input_tokens > 0, encoder_input_tokens > 0,
                                    cfg.compute_dtype)
    if encoder_segment_ids is not None:
      mask = attn.combine_masks(mask, _segment_mask(encoder_segment_ids, encoder_segment_ids),
                                dtype=cfg.compute_dtype)
    with jax.named_scope("encoder"):
      return self.encoder(encoder_input_tokens, mask, enable_dropout=enable_dropout,
                          site_inputs=site_inputs)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, enable_dropout: bool = True,
             decode: bool = False, max_decode_length: Optional[int] = None,
             site_inputs: Optional[dict] = None, cache_cross_attention: bool = False) -> Array:
    """Decoder logits [B, T, V] given ``encoded`` [B, L, D] (t5x masks and decode semantics).

    ``cache_cross_attention`` (with ``decode``): store the cross-attention keys/values of
    ``encoded`` in the cache so later steps skip their projection (`decoding.init_cache`);
    without it every step projects the ``encoded`` it is given, as t5x.
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    if decode:
      # As t5x: no self-attention padding mask in the cached path (causality is the cache's).
      decoder_mask = None
      encoder_decoder_mask = attn.make_attention_mask(
          jnp.ones_like(decoder_target_tokens), encoder_input_tokens > 0, dtype)
    else:
      decoder_mask = attn.combine_masks(
          attn.make_causal_mask(decoder_target_tokens, dtype),
          attn.make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0, dtype),
          _segment_mask(decoder_segment_ids, decoder_segment_ids)
          if decoder_segment_ids is not None else None, dtype=dtype)
      encoder_decoder_mask = attn.make_attention_mask(decoder_target_tokens > 0,
                                                      encoder_input_tokens > 0, dtype)
    if encoder_segment_ids is not None and decode:
      raise ValueError("Transformer.decode: packed inputs (encoder_segment_ids) cannot be "
                       "decoded incrementally (decode=True), as in t5x")
    if encoder_segment_ids is not None and decoder_segment_ids is None:
      raise ValueError("Transformer.decode: encoder_segment_ids need decoder_segment_ids (without "
                       "them packed examples would attend across each other)")
    if encoder_segment_ids is not None and decoder_segment_ids is not None and not decode:
      encoder_decoder_mask = attn.combine_masks(
          encoder_decoder_mask, _segment_mask(decoder_segment_ids, encoder_segment_ids),
          dtype=dtype)
    with jax.named_scope("decoder"):
      return self.decoder(encoded, decoder_input_tokens, decoder_positions, decoder_mask,
                          encoder_decoder_mask, enable_dropout=enable_dropout, decode=decode,
                          max_decode_length=max_decode_length, site_inputs=site_inputs,
                          cache_cross_attention=cache_cross_attention)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None,
               site_inputs: Optional[dict] = None) -> Array:
    """Teacher-forced logits [B, T, V]. ``site_inputs`` is forwarded to every site."""
    del encoder_positions  # relative positions only, as t5x's T5.
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                          enable_dropout=enable_dropout, site_inputs=site_inputs)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length, site_inputs=site_inputs)


def _segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """Packed examples attend only within their own segment: [B, 1, Q, K]."""
  return jnp.equal(query_segments[..., :, None], key_segments[..., None, :])[:, None]
