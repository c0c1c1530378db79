"""Device mesh, the logical-axis rules table, and shardings of parameter trees.

Follows t5x's partitioning model (``t5x/partitioning.py``, docs/usage/partitioning.md): every
parameter and key activation carries *logical* axis names (``batch``, ``embed``, ``mlp``, ``heads``,
``joined_kv``, ``vocab``, ...); ONE rules table (`logical_axis_rules`) maps them onto the two mesh
axes ``('data', 'model')``. Mesh axis names appear only in this file. Our additions: ``expert``
(the E axis of a stacked library, sharded over ``data`` by default so that experts are spread over
the data-parallel replicas, configurable) and ``lora_rank`` (replicated: R is small).

A dimension whose size is not divisible by its mesh axis (tiny test configs, 3 heads on 2 model
shards) is replicated instead of failing, with one warning per (logical name, size).

Multi-host: `maybe_initialize_distributed` calls ``jax.distributed.initialize()`` when asked (or when
JAX's coordinator env vars are set); each host then reads its own slice of the data with
``shard_id=jax.process_index()``, ``num_shards=jax.process_count()`` (`host_data_shard`).

Letters: B batch, L length, D model width, E experts, R LoRA rank.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import gin
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Sequence[Tuple[str, MeshAxes]]

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


class PartitioningError(ValueError):
  """A mesh or rules setting cannot be honoured (names the setting)."""


@gin.configurable(module="phatgoose_jax.training")
def logical_axis_rules(expert_axis: MeshAxes = DATA_AXIS,
                       activation_partitioning_dims: int = 1,
                       parameter_partitioning_dims: int = 1,
                       additional_rules: Optional[Rules] = None) -> Tuple[Tuple[str, MeshAxes], ...]:
  """The one logical -> mesh axis table (t5x ``standard_logical_axis_rules`` + ours).

  Args:
    expert_axis: mesh axis (or None to replicate) for the ``expert`` logical axis E.
    activation_partitioning_dims: 1 (t5x default) or 2 (also shard ``embed`` activations on model).
    parameter_partitioning_dims: 1 (t5x default) or 2 (also shard ``embed`` params on data).
    additional_rules: prepended, so they take precedence over the standard ones.

  Returns:
    A tuple of ``(logical_name, mesh_axes)`` pairs; the first applicable rule wins (flax semantics).
  """
  if expert_axis not in (None, DATA_AXIS, MODEL_AXIS):
    raise PartitioningError(
        f"logical_axis_rules.expert_axis must be None, {DATA_AXIS!r} or {MODEL_AXIS!r}, "
        f"got {expert_axis!r}")
  if activation_partitioning_dims not in (1, 2) or parameter_partitioning_dims not in (1, 2):
    raise PartitioningError("logical_axis_rules: activation/parameter_partitioning_dims must be 1 or 2")
  rules = [
      ("batch", DATA_AXIS),
      ("vocab", MODEL_AXIS),
      ("mlp", MODEL_AXIS),
      ("heads", MODEL_AXIS),
      ("kv", None),
      ("joined_kv", MODEL_AXIS),
      ("relpos_buckets", None),
      ("abspos_buckets", None),
      ("length", None),
      ("layers", None),
      ("stack", None),
      ("mlp_activations", None),
      # Ours.
      ("expert", expert_axis),
      ("lora_rank", None),
  ]
  if activation_partitioning_dims == 2:
    rules.append(("embed", MODEL_AXIS))
  if parameter_partitioning_dims == 2:
    rules.append(("embed", DATA_AXIS))
  rules.append(("embed", None))
  return tuple(additional_rules or ()) + tuple(rules)


def create_mesh(num_partitions: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``('data', 'model')`` mesh over ``devices`` (default: all of ``jax.devices()``).

  Args:
    num_partitions: size of the model axis (t5x's ``num_partitions``); the data axis takes the rest.
    devices: the devices to use (tests pass a subset).
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_partitions < 1 or len(devices) % num_partitions:
    raise PartitioningError(f"num_partitions={num_partitions} must divide the number of devices "
                            f"({len(devices)})")
  grid = np.asarray(devices, dtype=object).reshape(len(devices) // num_partitions, num_partitions)
  return Mesh(grid, MESH_AXES)


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def logical_spec_tree(axes_collection: Mapping[str, Any]) -> Any:
  """``params_axes`` / ``adapters_axes`` (flax AxisMetadata leaves) -> tree of logical PartitionSpecs.

  The returned tree has the structure of the matching variable collection (the ``_axes`` suffix of
  the metadata leaf names is removed by flax's ``get_axis_names``).
  """
  from flax.core import unfreeze  # pylint: disable=g-import-not-at-top
  return unfreeze(nn_partitioning.get_axis_names(unfreeze(axes_collection)))


_warned: set = set()


def mesh_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
              rules: Rules) -> P:
  """Logical axis names of an array of ``shape`` -> a mesh PartitionSpec, replicating indivisible dims."""
  if len(logical) != len(shape):
    raise PartitioningError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
  physical = list(nn.logical_to_mesh_axes(tuple(logical), rules))
  for i, (axes, size) in enumerate(zip(physical, shape)):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    n = int(np.prod([mesh.shape[a] for a in names]))
    if size % n:
      key = (logical[i], size, n)
      if key not in _warned:
        _warned.add(key)
        logging.warning("logical axis %r of size %d is not divisible by mesh axes %s (%d); "
                        "replicating it", logical[i], size, names, n)
      physical[i] = None
  return P(*physical)


def shardings_from_axes(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a variable tree from its logical axes.

  Args:
    axes_tree: tree of logical PartitionSpecs (`logical_spec_tree`) with the structure of
      ``shapes_tree``.
    shapes_tree: the arrays (or ShapeDtypeStructs) themselves, for divisibility checks.
    mesh: the device mesh.
    rules: `logical_axis_rules()`.
  """
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, mesh_spec(tuple(spec), x.shape, mesh,
                                                                    rules)),
                      axes_tree, shapes_tree, is_leaf=_is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a ``[B, L, ...]`` input array: ``batch`` on its mesh axis, the rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


_ACTIVE_SCOPES: list = []  # (mesh, rules) of the `partitioning_scope`s entered, innermost last


@contextlib.contextmanager
def partitioning_scope(mesh: Mesh, rules: Rules):
  """Mesh + logical axis rules in scope while steps are traced, so the model's
  `layers.logical_constraint` activations are sharded by the one rules table (as t5x's
  partitioner traces under its mesh and rules). `active_batch_shards` reads the innermost one."""
  set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
  with contextlib.ExitStack() as stack:
    stack.enter_context(set_mesh(mesh) if set_mesh is not None else mesh)
    stack.enter_context(nn.logical_axis_rules(tuple(rules)))
    _ACTIVE_SCOPES.append((mesh, tuple(rules)))
    try:
      yield
    finally:
      _ACTIVE_SCOPES.pop()


def active_batch_shards() -> int:
  """`batch_shards` of the innermost `partitioning_scope` (1 outside any): evaluation pads its
  batches to a multiple of it."""
  return batch_shards(*_ACTIVE_SCOPES[-1]) if _ACTIVE_SCOPES else 1


def round_up_to_active_batch_shards(rows: int) -> int:
  """``rows`` rounded up to a multiple of `active_batch_shards` (evaluation pads its batches)."""
  shards = active_batch_shards()
  return -(-rows // shards) * shards


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the ``batch`` axis is split: the product of the mesh axes it maps to."""
  spec = batch_sharding(mesh, rules, 1).spec
  names = spec[0] if spec else None
  if names is None:
    return 1
  names = (names,) if isinstance(names, str) else tuple(names)
  return int(np.prod([mesh.shape[n] for n in names]))


def local_batch_shards(mesh: Mesh, rules: Rules) -> int:
  """The batch shards one host feeds (all of them on one host): a host-local batch must have a
  multiple of this many rows."""
  return max(1, batch_shards(mesh, rules) // jax.process_count())


def check_batch_rows(rows: int, mesh: Mesh, rules: Rules, what: str = "batch") -> None:
  """Refuses a host-local batch of ``rows`` rows that does not split over this host's batch
  shards (JAX's own error names neither the batch size nor the mesh)."""
  shards = local_batch_shards(mesh, rules)
  if rows % shards:
    total = batch_shards(mesh, rules)
    raise ValueError(
        f"{what} of {rows} rows per host does not split over the {shards} data-parallel shards "
        f"of this host (the 'batch' axis is split {total} ways on {jax.process_count()} host(s), "
        f"mesh {dict(mesh.shape)}): use a multiple of {total} (BATCH_SIZE), or a larger "
        "train.num_partitions")


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict:
  """This host's numpy batch -> global jax arrays sharded along ``batch`` (works single-host too).

  Raises:
    ValueError: the rows do not split over this host's batch shards (`check_batch_rows`).
  """
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    check_batch_rows(int(v.shape[0]), mesh, rules)
    sharding = batch_sharding(mesh, rules, v.ndim)
    global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


def host_data_shard() -> Tuple[int, int]:
  """``(shard_id, num_shards)`` of this host for the data pipeline."""
  return jax.process_index(), jax.process_count()


_COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed(multihost: Optional[bool] = None) -> bool:
  """Calls ``jax.distributed.initialize()`` for multi-host runs; returns whether it did.

  Args:
    multihost: True forces initialisation (cluster auto-detection: TPU pods, SLURM, ...); False
      never initialises; None initialises iff a JAX coordinator env var is set.
  """
  if multihost is None:
    multihost = any(os.environ.get(name) for name in _COORDINATOR_ENV)
  if not multihost:
    return False
  jax.distributed.initialize()
  return True
