"""T5.1.1 configuration: a frozen dataclass, bound by gin.

Field names follow t5x's ``t5x.examples.t5.network.T5Config`` so that a t5x user's gin files read the
same (``emb_dim``, ``num_heads``, ``head_dim``, ``mlp_dim``, ...). Two fields are ours:
``param_dtype`` (t5x keeps params in float32 and computes in ``dtype``) and the relative-position
bucket settings, which t5x hard-codes (32 buckets, max distance 128) in its network.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import gin
import jax.numpy as jnp


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Dimensions and numerics of a T5.1.1 encoder-decoder.

  Attributes:
    vocab_size: rows of ``token_embedder/embedding`` and columns of ``decoder/logits_dense``.
    emb_dim: model width D.
    num_heads: attention heads H.
    num_encoder_layers: encoder blocks.
    num_decoder_layers: decoder blocks.
    head_dim: per-head width; ``num_heads * head_dim`` is the joined q/k/v width.
    mlp_dim: gated FFN hidden width.
    mlp_activations: one activation per ``wi_i`` kernel; T5.1.1 is ``('gelu', 'linear')``.
    dropout_rate: dropout probability used when ``enable_dropout=True``.
    logits_via_embedding: tie the output projection to the embedding (T5.1.0); T5.1.1 is False.
    dtype: compute dtype (activations). bfloat16 by default, as t5x.
    param_dtype: parameter storage dtype (float32 by default).
    float32_attention_logits: compute attention softmax in float32 (t5x option).
    relative_attention_num_buckets: relative position buckets (t5x hard-codes 32).
    relative_attention_max_distance: bucketing max distance (t5x hard-codes 128).
    layer_norm_epsilon: RMS norm epsilon (1e-6 in t5x).
  """
  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_activations: Tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  dtype: Any = "bfloat16"
  param_dtype: Any = "float32"
  float32_attention_logits: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6

  def __post_init__(self):
    # gin passes lists for tuple-valued fields; keep the dataclass hashable.
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    for field in ("vocab_size", "emb_dim", "num_heads", "num_encoder_layers",
                  "num_decoder_layers", "head_dim", "mlp_dim"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"T5Config.{field} must be a positive int, got {value!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["mlp_activations"] = list(self.mlp_activations)
    d["dtype"] = str(jnp.dtype(self.dtype))
    d["param_dtype"] = str(jnp.dtype(self.param_dtype))
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "T5Config":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown T5Config field(s): {', '.join(unknown)}")
    return cls(**d)


def tiny_config(**overrides) -> T5Config:
  """The CPU test preset: odd-sized so that a transposed axis cannot pass by accident."""
  base = dict(vocab_size=96, emb_dim=24, num_heads=3, num_encoder_layers=2,
              num_decoder_layers=3, head_dim=8, mlp_dim=40, dropout_rate=0.0,
              dtype="float32", param_dtype="float32")
  base.update(overrides)
  return T5Config(**base)
