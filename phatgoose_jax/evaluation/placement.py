"""Evaluation on a device mesh (t5x's partitioner, for scoring and decoding).

`place_for_evaluation` puts the base parameters and the (routed) adapters on a ``('data',
'model')`` mesh with the shardings the logical-axis rules give them (the same rules table as
training: kernels split over ``model``, a library's experts over ``data`` when E divides it), and
`partitioning.partitioning_scope` traces the scoring / decoding steps under that mesh and those
rules, so the model's activation constraints shard the batch over ``data``. The scorers pad their
batches to a multiple of the data shards (`partitioning.active_batch_shards`). Results equal the
one-device evaluation (tests/evaluation/test_placement.py). On several hosts each host builds its
mesh from its own devices and evaluates every example (no global arrays; host 0 writes the
report).

No tensors with named axes here, so no einsum letters are used.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import jax

from phatgoose_jax.adapters import init_variables
from phatgoose_jax.training import partitioning


def place_for_evaluation(model: Any, variables: Mapping[str, Any], num_partitions: int = 1,
                         devices: Optional[Sequence[jax.Device]] = None,
                         rules: Optional[Sequence] = None) -> tuple[dict, Any, tuple]:
  """(variables on the mesh, mesh, rules) for evaluating ``model``.

  Args:
    model: the `Transformer` that will be evaluated (its init gives the logical axes).
    variables: ``{'params': ..., ['adapters': ...]}`` (numpy or jax arrays, any other
      collections are passed through).
    num_partitions: size of the mesh's ``model`` axis (t5x's ``num_partitions``).
    devices: the devices (default all of ``jax.devices()``).
    rules: logical-axis rules (default `partitioning.logical_axis_rules()`).

  Raises:
    PartitioningError: ``num_partitions`` does not divide the device count.
    ValueError: on several hosts (not supported).
  """
  if devices is None and jax.process_count() > 1:
    devices = jax.local_devices()  # each host evaluates on its own devices (no global arrays)
  mesh = partitioning.create_mesh(num_partitions, devices)
  rules = tuple(partitioning.logical_axis_rules() if rules is None else rules)
  shapes = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
  out = dict(variables)
  for name in ("params", "adapters"):
    tree = variables.get(name)
    if not tree:
      continue
    axes = shapes.get(name + "_axes")
    if axes:
      tree = _prune(tree, axes)  # leaves the model does not declare (a library with more
      # sites than the model's site pattern routes) are unused: flax ignores them too
      shardings = partitioning.shardings_from_axes(partitioning.logical_spec_tree(axes), tree,
                                                   mesh, rules)
    else:
      shardings = jax.tree.map(lambda _: partitioning.replicated(mesh), tree)
    out[name] = jax.device_put(tree, shardings)
  return out, mesh, rules


def _prune(tree: Any, axes: Any) -> Any:
  """``tree`` restricted to the keys of the axes collection (``x_axes`` names ``x``)."""
  if not isinstance(tree, Mapping) or not isinstance(axes, Mapping):
    return tree
  keep = {}
  for key, value in tree.items():
    sub = axes.get(key, axes.get(f"{key}_axes"))
    if sub is not None:
      keep[key] = _prune(value, sub)
  return keep
