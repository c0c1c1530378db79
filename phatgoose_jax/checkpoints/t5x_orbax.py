"""Reader for Orbax checkpoints as t5x writes them (``OrbaxCheckpointManagerInterface``).

Layout of ``checkpoint_N/``: ``_CHECKPOINT_METADATA`` (JSON), ``dataset/``, and ``state/``, an
Orbax ``PyTreeCheckpointHandler`` item. ``state/_METADATA`` (JSON) lists every leaf as a key
path (``tree_metadata``) and says whether the arrays live in one OCDBT store (``use_ocdbt``) and
whether they are zarr v2 or v3 (``use_zarr3``). Each leaf is one array whose key is the
``.``-joined tree path, e.g. ``target.encoder.layers_0.attention.query.kernel``:
  * with OCDBT: ``{'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'base': <state dir>,
    'path': key}}``;
  * without OCDBT: a directory ``state/<key>/`` holding the zarr array.

Only leaves under ``target`` are read; optimizer state (``state.param_states.*``) is never read.
The same reader serves any Orbax PyTree item (``prefix=None`` reads every leaf).
"""
from __future__ import annotations

import ast
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from phatgoose_jax.checkpoints.shapes import CheckpointError
from phatgoose_jax.checkpoints.t5x_legacy import is_remote, latest_step_dir

_METADATA = "_METADATA"
_STATE = "state"
_OCDBT_MANIFEST = "manifest.ocdbt"


def _join(base: str, rel: str) -> str:
  return base.rstrip("/") + "/" + rel if is_remote(base) else os.path.join(base, rel)


def _is_pytree_item(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, _METADATA))


def find_orbax_state_dir(path: str) -> Optional[str]:
  """The Orbax PyTree item directory that ``path`` designates, or None.

  Accepts the item directory itself (``.../checkpoint_N/state``), the step directory
  (``.../checkpoint_N``), or (local only) a parent of ``checkpoint_N`` directories (highest N).
  Remote (``gs://``) paths are taken as a step directory unless they end in ``/state``.
  """
  path = str(path)
  if is_remote(path):
    return path.rstrip("/") if path.rstrip("/").endswith("/" + _STATE) else _join(path, _STATE)
  if not os.path.isdir(path):
    return None
  if _is_pytree_item(path):
    return path
  if _is_pytree_item(os.path.join(path, _STATE)):
    return os.path.join(path, _STATE)
  step_dir = latest_step_dir(path)
  if step_dir is not None and _is_pytree_item(os.path.join(step_dir, _STATE)):
    return os.path.join(step_dir, _STATE)
  return None


def _exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  directory, name = path.rsplit("/", 1)
  return ts.KvStore.open(directory + "/").result().read(name).result().state == "value"


def _read_text(path: str) -> str:
  if not is_remote(path):
    with open(path, "r", encoding="utf-8") as f:
      return f.read()
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  directory, name = path.rsplit("/", 1)
  result = ts.KvStore.open(directory + "/").result().read(name).result()
  if result.state != "value":
    raise CheckpointError(f"no Orbax metadata file at {path}")
  return bytes(result.value).decode("utf-8")


def _leaf_paths(metadata: dict, state_dir: str) -> List[Tuple[str, ...]]:
  """Key paths of every leaf listed in ``_METADATA``."""
  tree = metadata.get("tree_metadata")
  if not isinstance(tree, dict):
    raise CheckpointError(f"{_join(state_dir, _METADATA)} has no 'tree_metadata' map")
  paths = []
  for key, entry in tree.items():
    if isinstance(entry, dict) and "key_metadata" in entry:
      paths.append(tuple(str(k["key"]) for k in entry["key_metadata"]))
    else:  # Older Orbax: the key is the repr of the tuple path.
      paths.append(tuple(str(k) for k in ast.literal_eval(key)))
  return paths


def _leaf_spec(state_dir: str, key: str, use_ocdbt: bool, use_zarr3: bool) -> dict:
  driver = "zarr3" if use_zarr3 else "zarr"
  if is_remote(state_dir):
    base = state_dir.rstrip("/") + "/"
  else:
    base = "file://" + os.path.abspath(state_dir) + "/"
  if use_ocdbt:
    return {"driver": driver, "kvstore": {"driver": "ocdbt", "base": base, "path": key}}
  return {"driver": driver, "kvstore": base + key + "/"}


def read_orbax_pytree(path: str, prefix: Optional[str] = "target") -> Dict[str, np.ndarray]:
  """Reads the array leaves of an Orbax PyTree item with TensorStore.

  Args:
    path: ``checkpoint_N/state``, ``checkpoint_N``, or a parent of ``checkpoint_N`` dirs.
    prefix: first key of the leaves to read (``'target'`` = t5x model parameters); it is stripped
      from the returned names. None reads every leaf.

  Returns:
    ``{'/'-path: numpy array}``, as stored (no dtype cast).

  Raises:
    CheckpointError: naming the path if it holds no Orbax item, the prefix is absent, or a leaf
      cannot be read.
  """
  state_dir = find_orbax_state_dir(path)
  if state_dir is None:
    raise CheckpointError(f"no Orbax checkpoint item ('{_STATE}/{_METADATA}') found at {path}")
  metadata_path = _join(state_dir, _METADATA)
  try:
    metadata = json.loads(_read_text(metadata_path))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read Orbax metadata {metadata_path}: {e}") from e
  if "use_ocdbt" in metadata:
    use_ocdbt = bool(metadata["use_ocdbt"])
  else:  # older Orbax metadata: as Orbax, an OCDBT store is recognised by its manifest file
    use_ocdbt = _exists(_join(state_dir, _OCDBT_MANIFEST))
  use_zarr3 = bool(metadata.get("use_zarr3", False))
  leaves = _leaf_paths(metadata, state_dir)
  if prefix is not None:
    leaves = [p[1:] for p in leaves if p and p[0] == prefix]
    if not leaves:
      raise CheckpointError(f"Orbax checkpoint {state_dir} has no '{prefix}' leaves")

  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  context = ts.Context()  # One context: the OCDBT manifest is opened once, not per leaf.
  flat: Dict[str, np.ndarray] = {}
  for leaf in leaves:
    key = ".".join(((prefix,) if prefix is not None else ()) + leaf)
    name = "/".join(leaf)
    spec = _leaf_spec(state_dir, key, use_ocdbt, use_zarr3)
    try:
      store = ts.open(spec, open=True, read=True, context=context).result()
      flat[name] = np.asarray(store.read().result())
    except Exception as e:
      raise CheckpointError(
          f"Orbax checkpoint {state_dir}: cannot read parameter {name!r} (key {key!r}): {e}") from e
  return flat


__all__ = ["find_orbax_state_dir", "read_orbax_pytree"]
