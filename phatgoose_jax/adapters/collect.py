"""Collecting per-example site-input means (for the Average Activation baseline's prototypes).

Letters: B batch, L tokens of the site input (encoder or decoder tokens), D site input width.

The Average Activation baseline of Muqeeth et al. (ICML 2024, sec. 5.1) routes with the same
PHATGOOSE router as the gates, but the router vector of an expert is the average of the site-input
activations over the expert's training data. The official code (r-three/phatgoose,
``src/models/addons/moe.py``, ``FFNExperts(replace_with_weighted_hiddens=True)``) computes, per
example, ``sum_t w_t u_t`` with ``w = mask / (sum(mask) + 1e-6)``, where the mask is the ENCODER
padding mask and is applied only to sites whose input has encoder length (decoder sites average all
tokens). We sow that per-example mean; averaging over a task's examples is the caller's job.

Masks are passed to the model through ``site_inputs`` (forwarded to every site):
  * ``site_inputs['encoder_token_mask']`` [B, L] (1 = real token) is used by sites whose input is
    encoder tokens: every ``encoder/*`` site and
    ``decoder/*/encoder_decoder_attention/{key,value}``;
    ``site_inputs['token_mask']`` is accepted as an alias of it.
  * ``site_inputs['decoder_token_mask']`` [B, T] is used by the other decoder sites.
  * without a mask for its side, a site takes the plain mean over its tokens (as the official code
    does for decoder sites).
The means are sown into ``intermediates`` as ``site_input_mean`` ([B, D] float32), only when the
caller makes ``intermediates`` mutable (``model.apply(..., mutable=['intermediates'])``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from phatgoose_jax.models.layers import DenseSite

Array = jax.Array

# The official code's epsilon in the per-example weight normalisation.
MEAN_EPS = 1e-6
_ENCODER_TOKEN_SITE = re.compile(r"encoder/.*|decoder/.*/encoder_decoder_attention/(key|value)")


def site_token_side(site: str) -> str:
  """'encoder' if the site's input is encoder tokens, else 'decoder'.

  Encoder sites and cross-attention key/value see encoder tokens; decoder self-attention, FFN and
  cross-attention query/out see decoder tokens.
  """
  return "encoder" if _ENCODER_TOKEN_SITE.fullmatch(site) else "decoder"


def token_mask_for_site(site: str, site_inputs: Mapping[str, Any],
                        token_shape: tuple) -> Optional[Array]:
  """The token mask [B, L] that applies to ``site``'s input, or None.

  Raises:
    ValueError: the mask given for this side does not have the site input's token shape.
  """
  if site_token_side(site) == "encoder":
    keys = ("encoder_token_mask", "token_mask")
  else:
    keys = ("decoder_token_mask",)
  for key in keys:
    if site_inputs.get(key) is not None:
      mask = jnp.asarray(site_inputs[key])
      if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(
            f"site_inputs[{key!r}] has shape {tuple(mask.shape)} but site {site!r} sees tokens of "
            f"shape {tuple(token_shape)}")
      return mask
  return None


def masked_token_mean(x: Array, mask: Optional[Array]) -> Array:
  """Per-example mean over the token axes of ``x`` [B, ..., D] -> [B, D], float32.

  With a mask [B, ...]: ``sum(mask * x) / (sum(mask) + 1e-6)`` (official code's normalisation).
  Without: plain mean over the token axes.
  """
  x = jnp.asarray(x, jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  if mask is None:
    return jnp.mean(x, axis=axes)
  m = jnp.asarray(mask, jnp.float32)[..., None]  # [B, ..., 1]
  total = jnp.sum(m, axis=axes)  # [B, 1]
  return jnp.sum(x * m, axis=axes) / (total + MEAN_EPS)


def sow_site_input_mean(module: nn.Module, site: str, x: Array,
                        site_inputs: Mapping[str, Any]) -> None:
  """Sows ``site_input_mean`` [B, D] into ``intermediates`` (no-op when it is not mutable)."""
  if not module.is_mutable_collection("intermediates"):
    return
  if x.ndim < 2:
    raise ValueError(f"site {site!r}: collecting input means needs x [B, ..., D], got {x.shape}")
  mask = token_mask_for_site(site, site_inputs, tuple(x.shape[:-1]))
  module.sow("intermediates", "site_input_mean", masked_token_mean(x, mask))


class CollectingDenseSite(DenseSite):
  """A plain base projection that also sows its per-example input mean (mode 'none' + collect)."""

  @nn.compact
  def __call__(self, x: Array, **site_inputs) -> Array:
    y = self.base_projection(x)
    sow_site_input_mean(self, self.site, x, site_inputs)
    return y
