"""Greedy decoding with the key/value cache, t5x-compatible.

As t5x's ``EncoderDecoderModel.predict_batch`` with ``temperature_sample(temperature=0)``: the cache is
initialised by one ``decode=True`` pass over an all-zero decoder prompt of the maximum length; then each
step feeds the previous token (starting from 0), appends the argmax, and tokens after an EOS are 0.

Letters: B batch, L encoder length, T decoded length, V vocab.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def init_cache(model: nn.Module, variables: Mapping[str, Any], encoded: Array,
               encoder_input_tokens: Array, max_decode_length: int,
               site_inputs: Optional[dict] = None):
  """Returns the ``cache`` collection for ``max_decode_length`` steps (cross-attention k/v filled)."""
  batch = encoder_input_tokens.shape[0]
  dummy = jnp.zeros((batch, max_decode_length), jnp.int32)
  _, state = model.apply(dict(variables), encoded, encoder_input_tokens, dummy, dummy,
                         enable_dropout=False, decode=True, max_decode_length=max_decode_length,
                         site_inputs=site_inputs, cache_cross_attention=True, mutable=["cache"],
                         method=model.decode)
  return state["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id"))
def greedy_decode(model: nn.Module, variables: Mapping[str, Any], encoder_input_tokens: Array,
                  max_decode_length: int, eos_id: int = 1,
                  site_inputs: Optional[dict] = None) -> Array:
  """Greedy tokens [B, T] for ``encoder_input_tokens`` [B, L].

  Args:
    model: a `Transformer` (any site factory; routed sites route each new token).
    variables: ``{'params': ..., ['adapters': ...]}`` without ``cache``.
    encoder_input_tokens: [B, L] int, 0 = pad.
    max_decode_length: T, number of steps.
    eos_id: the EOS id; positions after the first EOS are 0.
    site_inputs: per-example extras forwarded to every site.
  """
  variables = {k: v for k, v in variables.items() if k != "cache"}
  encoded = model.apply(variables, encoder_input_tokens, enable_dropout=False,
                        site_inputs=site_inputs, method=model.encode)  # [B, L, D]
  cache = init_cache(model, variables, encoded, encoder_input_tokens, max_decode_length,
                     site_inputs)
  batch = encoder_input_tokens.shape[0]

  def step(i, carry):
    cache, tokens, prev, ended = carry
    logits, state = model.apply(
        {**variables, "cache": cache}, encoded, encoder_input_tokens, prev[:, None], prev[:, None],
        enable_dropout=False, decode=True, max_decode_length=max_decode_length,
        site_inputs=site_inputs, mutable=["cache"], method=model.decode)
    nxt = jnp.argmax(logits[:, -1, :].astype(jnp.float32), axis=-1).astype(jnp.int32)  # [B]
    nxt = jnp.where(ended, 0, nxt)
    tokens = tokens.at[:, i].set(nxt)
    ended = jnp.logical_or(ended, nxt == eos_id)
    return state["cache"], tokens, nxt, ended

  tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
  carry = (cache, tokens, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
  _, tokens, _, _ = jax.lax.fori_loop(0, max_decode_length, step, carry)
  return tokens
