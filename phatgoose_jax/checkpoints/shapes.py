"""The T5.1.1 parameter tree as t5x lays it out: expected shapes, config inference, path helpers.

Every checkpoint reader in this package produces the same tree: the one built by
``t5x.examples.t5.network.Transformer`` (names such as ``encoder/layers_0/attention/query/kernel``),
so that a stock T5X checkpoint, an HF T5 checkpoint and our own checkpoints are interchangeable.

Letters used in shape comments: V vocab, D model width (``emb_dim``), H heads, Hd head width,
F MLP hidden width (``mlp_dim``), N relative-position buckets.

Conventions (t5x ``network.py``):
  * dense kernels are ``[in, out]``; q/k/v kernels are ``[D, H*Hd]`` and ``out`` is ``[H*Hd, D]``;
  * ``rel_embedding`` is ``[H, N]``, one table per stack, shared by all layers of that stack;
  * layer norms hold only ``scale [D]``;
  * the MLP has one input kernel per activation: ``wi_{i}`` when there are several activations, a
    single ``wi`` when there is one;
  * ``decoder/logits_dense/kernel [D, V]`` exists only when ``logits_via_embedding`` is False.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

from phatgoose_jax.models.config import T5Config

Shape = Tuple[int, ...]


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not match the expected T5 parameter tree."""


# ----------------------------------------------------------------------------------------------
# Nested dict <-> '/'-joined paths.
# ----------------------------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  """Flattens a nested dict into ``{'a/b/c': leaf}``; non-dict values are leaves.

  Args:
    tree: nested mapping (e.g. a t5x ``params`` tree).
    sep: separator used to join keys.

  Returns:
    A flat dict, with keys in depth-first insertion order.
  """
  flat: Dict[str, Any] = {}

  def visit(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      key = str(key)
      path = f"{prefix}{sep}{key}" if prefix else key
      if isinstance(value, Mapping):
        visit(value, path)
      else:
        flat[path] = value

  visit(tree, "")
  return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  """Inverse of :func:`flatten_params`: ``{'a/b': x}`` -> ``{'a': {'b': x}}``.

  Raises:
    CheckpointError: if one path is both a leaf and a prefix of another path.
  """
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    parts = path.split(sep)
    node = tree
    for i, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise CheckpointError(
            f"parameter path {sep.join(parts[:i + 1])!r} is both a leaf and a sub-tree "
            f"(while inserting {path!r})")
      node = child
    if parts[-1] in node:
      raise CheckpointError(f"duplicate or conflicting parameter path {path!r}")
    node[parts[-1]] = value
  return tree


# ----------------------------------------------------------------------------------------------
# Expected tree.
# ----------------------------------------------------------------------------------------------


def mlp_input_names(mlp_activations) -> Tuple[str, ...]:
  """Names of the MLP input kernels, as t5x's ``MlpBlock`` names them."""
  n = len(tuple(mlp_activations))
  if n == 0:
    raise CheckpointError("T5Config.mlp_activations must not be empty")
  return ("wi",) if n == 1 else tuple(f"wi_{i}" for i in range(n))


def expected_param_shapes(config: T5Config) -> Dict[str, Shape]:
  """Every parameter path of t5x's T5.1.1 ``Transformer`` mapped to its shape.

  Args:
    config: the model configuration.

  Returns:
    ``{'encoder/layers_0/attention/query/kernel': (D, H*Hd), ...}``.
  """
  d, v, f = config.emb_dim, config.vocab_size, config.mlp_dim
  hk = config.num_heads * config.head_dim  # joined_kv
  shapes: Dict[str, Shape] = {"token_embedder/embedding": (v, d)}

  def attention(prefix: str) -> None:
    for name in ("query", "key", "value"):
      shapes[f"{prefix}/{name}/kernel"] = (d, hk)
    shapes[f"{prefix}/out/kernel"] = (hk, d)

  def mlp(prefix: str) -> None:
    for name in mlp_input_names(config.mlp_activations):
      shapes[f"{prefix}/{name}/kernel"] = (d, f)
    shapes[f"{prefix}/wo/kernel"] = (f, d)

  relpos = (config.num_heads, config.relative_attention_num_buckets)
  shapes["encoder/relpos_bias/rel_embedding"] = relpos
  for i in range(config.num_encoder_layers):
    p = f"encoder/layers_{i}"
    shapes[f"{p}/pre_attention_layer_norm/scale"] = (d,)
    attention(f"{p}/attention")
    shapes[f"{p}/pre_mlp_layer_norm/scale"] = (d,)
    mlp(f"{p}/mlp")
  shapes["encoder/encoder_norm/scale"] = (d,)

  shapes["decoder/relpos_bias/rel_embedding"] = relpos
  for i in range(config.num_decoder_layers):
    p = f"decoder/layers_{i}"
    shapes[f"{p}/pre_self_attention_layer_norm/scale"] = (d,)
    attention(f"{p}/self_attention")
    shapes[f"{p}/pre_cross_attention_layer_norm/scale"] = (d,)
    attention(f"{p}/encoder_decoder_attention")
    shapes[f"{p}/pre_mlp_layer_norm/scale"] = (d,)
    mlp(f"{p}/mlp")
  shapes["decoder/decoder_norm/scale"] = (d,)
  if not config.logits_via_embedding:
    shapes["decoder/logits_dense/kernel"] = (d, v)
  return shapes


def check_param_shapes(flat_shapes: Mapping[str, Shape], config: T5Config, source: str) -> None:
  """Checks a flat ``{path: shape}`` against :func:`expected_param_shapes`.

  Args:
    flat_shapes: the shapes found in a checkpoint.
    config: the configuration they must match.
    source: the checkpoint path, quoted in error messages.

  Raises:
    CheckpointError: naming ``source``, and every missing / unexpected parameter, or the
      parameters whose shapes differ (first five), with found and expected shapes.
  """
  expected = expected_param_shapes(config)
  missing = sorted(set(expected) - set(flat_shapes))
  unexpected = sorted(set(flat_shapes) - set(expected))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing parameter(s): {', '.join(missing)}")
    if unexpected:
      parts.append(f"unexpected parameter(s): {', '.join(unexpected)}")
    raise CheckpointError(
        f"checkpoint {source} does not match the T5 parameter tree of the config: "
        + "; ".join(parts))
  wrong = []
  for path in sorted(expected):
    found = tuple(int(s) for s in flat_shapes[path])
    if found != expected[path]:
      wrong.append(f"parameter {path!r} has shape {found}, expected {expected[path]}")
  if wrong:
    more = f"; and {len(wrong) - 5} more" if len(wrong) > 5 else ""
    raise CheckpointError(
        f"checkpoint {source} does not match the config: " + "; ".join(wrong[:5]) + more)


# ----------------------------------------------------------------------------------------------
# Config inference from shapes.
# ----------------------------------------------------------------------------------------------

_ACTIVATIONS_BY_COUNT = {1: ("relu",), 2: ("gelu", "linear")}


def _count_layers(flat_shapes: Mapping[str, Shape], stack: str) -> int:
  pattern = re.compile(rf"^{stack}/layers_(\d+)/")
  indices = {int(m.group(1)) for p in flat_shapes for m in [pattern.match(p)] if m}
  if not indices:
    raise CheckpointError(f"no {stack}/layers_* parameters found; cannot infer the layer count")
  if indices != set(range(len(indices))):
    raise CheckpointError(
        f"{stack} layer indices are not contiguous from 0: {sorted(indices)}")
  return len(indices)


def infer_config(flat_shapes: Mapping[str, Shape], **overrides) -> T5Config:
  """Infers a :class:`T5Config` from the shapes of a t5x T5 parameter tree.

  Dimensions come from the arrays: vocab/width from ``token_embedder/embedding [V, D]``, heads and
  buckets from ``encoder/relpos_bias/rel_embedding [H, N]``, head width from the query kernel
  ``[D, H*Hd]``, MLP width from the first MLP input kernel ``[D, F]``, layer counts from the
  ``layers_{i}`` indices. The activations cannot be read from shapes: two ``wi_*`` kernels are
  assumed to be T5.1.1's ``('gelu', 'linear')`` and a single ``wi`` T5.1.0's ``('relu',)``;
  pass ``mlp_activations=...`` to override. ``logits_via_embedding`` is True when
  ``decoder/logits_dense/kernel`` is absent. Non-shape fields (dropout, dtypes, max distance,
  epsilon) keep the :class:`T5Config` defaults unless overridden.

  Args:
    flat_shapes: ``{'/'-path: shape}``.
    **overrides: T5Config fields that replace the inferred values.

  Returns:
    The inferred config.

  Raises:
    CheckpointError: if a parameter needed for inference is missing or inconsistent.
  """
  def shape_of(path: str, rank: int = 2) -> Shape:
    if path not in flat_shapes:
      raise CheckpointError(f"cannot infer the T5 config: parameter {path!r} is missing")
    shape = tuple(int(s) for s in flat_shapes[path])
    if len(shape) != rank:
      raise CheckpointError(f"cannot infer the T5 config: parameter {path!r} has shape "
                            f"{shape}, expected {rank} dims")
    return shape

  vocab_size, emb_dim = shape_of("token_embedder/embedding")
  num_heads, num_buckets = shape_of("encoder/relpos_bias/rel_embedding")
  joined_kv = shape_of("encoder/layers_0/attention/query/kernel")[1]
  if joined_kv % num_heads:
    raise CheckpointError(
        f"cannot infer head_dim: encoder/layers_0/attention/query/kernel width {joined_kv} is "
        f"not a multiple of the {num_heads} heads of encoder/relpos_bias/rel_embedding")
  mlp_names = sorted({p.split("/")[3] for p in flat_shapes
                      if re.match(r"^encoder/layers_0/mlp/wi(_\d+)?/kernel$", p)})
  if not mlp_names:
    raise CheckpointError("cannot infer the MLP: no encoder/layers_0/mlp/wi*/kernel parameter")
  inferred: Dict[str, Any] = dict(
      vocab_size=vocab_size,
      emb_dim=emb_dim,
      num_heads=num_heads,
      head_dim=joined_kv // num_heads,
      num_encoder_layers=_count_layers(flat_shapes, "encoder"),
      num_decoder_layers=_count_layers(flat_shapes, "decoder"),
      mlp_dim=shape_of(f"encoder/layers_0/mlp/{mlp_names[0]}/kernel")[1],
      relative_attention_num_buckets=num_buckets,
      logits_via_embedding="decoder/logits_dense/kernel" not in flat_shapes,
  )
  if "mlp_activations" not in overrides:
    if len(mlp_names) not in _ACTIVATIONS_BY_COUNT:
      raise CheckpointError(
          f"cannot infer mlp_activations from {len(mlp_names)} MLP input kernels "
          f"({', '.join(mlp_names)}); pass mlp_activations explicitly")
    inferred["mlp_activations"] = _ACTIVATIONS_BY_COUNT[len(mlp_names)]
  inferred.update(overrides)
  try:
    return T5Config(**inferred)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"inferred T5 config is invalid: {e}") from e


def shapes_of(flat: Mapping[str, Any]) -> Dict[str, Shape]:
  """``{path: array}`` -> ``{path: shape}``."""
  return {k: tuple(int(s) for s in v.shape) for k, v in flat.items()}

