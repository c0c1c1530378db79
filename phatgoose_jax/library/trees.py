"""Conversions between per-site expert arrays and the ``adapters`` collection, and placement.

* `lora_from_adapters_tree`: a single-expert ``adapters`` collection (nested dict, as a training
  export holds) -> ``{site: {'lora_a' [D, R], 'lora_b' [R, F]}}`` and its gates;
* `to_adapters_tree`: ``{site: {leaf: array}}`` (e.g. `ExpertLibrary.stack`'s ``[E, ...]``
  arrays) -> the nested ``adapters`` layout (``tree['encoder']['layers_0']['attention']
  ['query']['lora_a']``);
* `place_stacked`: stacked arrays onto a mesh, sharded along the expert axis.

Letters: E experts, D site input width, F site output width, R LoRA rank.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from phatgoose_jax.library.format import LibraryError

Array = Any


def lora_from_adapters_tree(tree: Mapping[str, Any]
                            ) -> Tuple[Dict[str, Dict[str, np.ndarray]],
                                       Optional[Dict[str, Array]]]:
  """Extracts ``(lora, gates)`` from a single-expert ``adapters`` collection (nested dict).

  Every sub-dict holding ``lora_a`` and ``lora_b`` is a site named by its '/'-joined path; a
  ``gate`` beside them goes into ``gates`` (None if no site has one).
  """
  lora: Dict[str, Dict[str, np.ndarray]] = {}
  gates: Dict[str, Array] = {}

  def visit(node: Mapping[str, Any], path: Tuple[str, ...]) -> None:
    if "lora_a" in node and "lora_b" in node:
      site = "/".join(path)
      lora[site] = {"lora_a": np.asarray(node["lora_a"]), "lora_b": np.asarray(node["lora_b"])}
      if "gate" in node:
        gates[site] = np.asarray(node["gate"])
      return
    for key, value in node.items():
      if isinstance(value, Mapping):
        visit(value, path + (str(key),))

  visit(tree, ())
  if not lora:
    raise LibraryError("adapters tree holds no site with both 'lora_a' and 'lora_b'")
  return lora, (gates or None)


def to_adapters_tree(stacked: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """``{site: {...}}`` -> the nested ``adapters`` collection layout (``tree['encoder']['layers_0']
  ['attention']['query']['lora_a']``)."""
  tree: Dict[str, Any] = {}
  for site, leaves in stacked.items():
    node = tree
    for part in site.split("/"):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise LibraryError(f"site {site!r} collides with an array at {part!r}")
    for key, value in leaves.items():
      if key in node:
        raise LibraryError(f"site {site!r}: duplicate leaf {key!r}")
      node[key] = value
  return tree


def place_stacked(stacked: Mapping[str, Mapping[str, Any]], mesh: Any,
                  expert_axis: Optional[str]) -> Dict[str, Dict[str, Any]]:
  """Puts stacked arrays on ``mesh`` sharded along the expert axis (leading dim), others replicated.

  The expert dim only: the Trainer and `evaluation.placement` place a model's library by the whole
  logical-axis rules table instead (also ``lora_b``'s output dim over ``model``; an E that does not
  divide its axis is replicated there with a warning, refused here).

  Args:
    stacked: output of `ExpertLibrary.stack`.
    mesh: a ``jax.sharding.Mesh``.
    expert_axis: the mesh axis name that the logical 'expert' axis maps to (from the rules table),
      or None to replicate.

  Raises:
    LibraryError: unknown mesh axis, or E not divisible by that axis' size.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  if expert_axis is not None and expert_axis not in mesh.shape:
    raise LibraryError(f"expert_axis {expert_axis!r} is not an axis of the mesh "
                       f"{dict(mesh.shape)}")
  placed: Dict[str, Dict[str, Any]] = {}
  for site, leaves in stacked.items():
    placed[site] = {}
    for key, value in leaves.items():
      value = np.asarray(value)
      if expert_axis is not None and value.shape[0] % mesh.shape[expert_axis]:
        raise LibraryError(f"{site}/{key}: {value.shape[0]} experts cannot be split over mesh "
                           f"axis {expert_axis!r} of size {mesh.shape[expert_axis]}")
      spec = PartitionSpec(expert_axis, *([None] * (value.ndim - 1)))
      placed[site][key] = jax.device_put(value, NamedSharding(mesh, spec))
  return placed
