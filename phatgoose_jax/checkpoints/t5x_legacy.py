"""Reader for legacy T5X checkpoints (``t5x.checkpoints.Checkpointer``): msgpack + TensorStore.

Layout of ``checkpoint_N/``:
  * ``checkpoint``: a msgpack map in flax's encoding, ``{'version': 3, 'optimizer': {'target':
    <params>, 'state': {...}}}``. Arrays are msgpack ext type 1 with payload
    ``msgpack((shape, dtype_name, C-order bytes))``; NumPy scalars are ext type 3 with the same
    payload at 0-d. Arrays over flax's chunk limit are dicts ``{'__msgpack_chunked_array__': True,
    'shape': ..., 'chunks': {'0': ..., ...}}``.
  * a leaf may instead be a TensorStore spec dict (it has a ``driver`` key) whose
    ``kvstore.path`` is relative to the checkpoint directory (t5x >= 2021), under kvstore driver
    ``file``, ``gfile`` or, for checkpoints saved to ``gs://``, ``gcs`` with a placeholder
    bucket (`_absolute_spec`); t5x writes the large arrays that way, one zarr array per
    directory named by the ``.``-joined key path.

Only ``optimizer/target`` (the model parameters) is read; optimizer state is never touched.
Paths may be local or URLs understood by TensorStore (``gs://bucket/dir``), which are passed to
TensorStore untouched.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional

import msgpack
import numpy as np

from phatgoose_jax.checkpoints.shapes import CheckpointError

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_CHUNKED_KEY = "__msgpack_chunked_array__"
_CHECKPOINT_FILE = "checkpoint"
_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def is_remote(path: str) -> bool:
  """True for URLs (``gs://...``) that are handed to TensorStore rather than the filesystem."""
  return "://" in str(path) and not str(path).startswith("file://")


def _join(base: str, rel: str) -> str:
  return base.rstrip("/") + "/" + rel if is_remote(base) else os.path.join(base, rel)


def latest_step_dir(parent: str) -> Optional[str]:
  """The ``checkpoint_N`` sub-directory of ``parent`` with the highest N, as t5x picks it."""
  if is_remote(parent) or not os.path.isdir(parent):
    return None
  steps = [(int(m.group(1)), name) for name in os.listdir(parent)
           for m in [_STEP_DIR.match(name)] if m and os.path.isdir(os.path.join(parent, name))]
  return os.path.join(parent, max(steps)[1]) if steps else None


def find_legacy_checkpoint(path: str) -> Optional[str]:
  """Returns the path of the ``checkpoint`` msgpack file that ``path`` designates, or None.

  ``path`` may be the file itself, the ``checkpoint_N`` directory, or (local only) a parent
  directory holding ``checkpoint_N`` sub-directories, in which case the highest N is used.
  """
  path = str(path)
  if is_remote(path):
    return path if path.rstrip("/").endswith("/" + _CHECKPOINT_FILE) else _join(path, _CHECKPOINT_FILE)
  if os.path.isfile(path):
    return path
  candidate = os.path.join(path, _CHECKPOINT_FILE)
  if os.path.isfile(candidate):
    return candidate
  step_dir = latest_step_dir(path)
  if step_dir is not None and os.path.isfile(os.path.join(step_dir, _CHECKPOINT_FILE)):
    return os.path.join(step_dir, _CHECKPOINT_FILE)
  return None


def _read_bytes(file_path: str) -> bytes:
  if not is_remote(file_path):
    with open(file_path, "rb") as f:
      return f.read()
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  directory, name = file_path.rstrip("/").rsplit("/", 1)
  kv = ts.KvStore.open(directory + "/").result()
  result = kv.read(name).result()
  if result.state != "value":
    raise CheckpointError(f"no T5X checkpoint file at {file_path}")
  return bytes(result.value)


def _ext_hook(code: int, data: bytes) -> Any:
  if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
    array = np.frombuffer(buffer, dtype=np.dtype(dtype_name)).reshape(shape)
    return array if code == _EXT_NDARRAY else array[()]
  raise CheckpointError(f"unsupported flax msgpack ext type {code}")


def _unchunk(node: Any) -> Any:
  """Reassembles flax's chunked arrays in place of their marker dicts."""
  if not isinstance(node, dict):
    return node
  if node.get(_CHUNKED_KEY):
    chunks, shape = node["chunks"], node["shape"]
    if isinstance(shape, dict):  # flax writes the shape tuple as a state dict {'0': n0, ...}
      shape = [shape[k] for k in sorted(shape, key=int)]
    parts = [np.asarray(chunks[k]).ravel() for k in sorted(chunks, key=int)]
    return np.concatenate(parts).reshape(tuple(int(n) for n in shape))
  return {k: _unchunk(v) for k, v in node.items()}


def read_msgpack_state(file_path: str) -> Dict[str, Any]:
  """Decodes a T5X ``checkpoint`` msgpack file into nested dicts (TensorStore specs left as dicts).

  Raises:
    CheckpointError: naming ``file_path`` if the bytes are not a flax msgpack map.
  """
  data = _read_bytes(file_path)
  try:
    state = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
  except CheckpointError:
    raise
  except Exception as e:  # msgpack raises several unrelated exception types.
    raise CheckpointError(
        f"{file_path} is not a T5X msgpack checkpoint (flax msgpack decoding failed: "
        f"{type(e).__name__}: {e})") from e
  if not isinstance(state, dict):
    raise CheckpointError(
        f"{file_path} is not a T5X msgpack checkpoint: top level is {type(state).__name__}, "
        f"expected a map with 'optimizer'")
  return _unchunk(state)


_GS_URL = re.compile(r"^gs://([^/]*)/?(.*)$", re.DOTALL)
_CHECKPOINT_DRIVERS = ("file", "gfile", "gcs")


def _absolute_spec(spec: Dict[str, Any], checkpoint_dir: str) -> Dict[str, Any]:
  """The TensorStore spec of a leaf, its kvstore path joined to the checkpoint directory.

  As t5x restores (``checkpoints._maybe_update_ts_from_gcs_to_file`` and
  ``_update_ts_path_from_relative_to_absolute``): whatever kvstore driver was written (``file``;
  ``gfile``; ``gcs`` with t5x's placeholder bucket ``t5x-dummy-bucket``, which is how every
  checkpoint saved to a ``gs://`` directory, the public T5X ones included, records its arrays),
  the path is relative to the checkpoint directory, so the array is read with the ``file``
  driver under a local directory and from the directory's own bucket under ``gs://``. An
  absolute ``file`` path is kept (``os.path.join`` semantics, as t5x).
  """
  spec = dict(spec)
  kvstore = spec.get("kvstore")
  if isinstance(kvstore, dict):
    kvstore = dict(kvstore)
    driver = kvstore.get("driver")
    rel = kvstore.get("path", "")
    if driver not in _CHECKPOINT_DRIVERS or not isinstance(rel, str):
      spec["kvstore"] = kvstore  # some other kvstore: handed to TensorStore as written
      return spec
    if driver == "file" and os.path.isabs(rel):
      return spec
    rel = rel.lstrip("/") if driver == "gcs" else rel
    spec["kvstore"] = _kvstore_under(checkpoint_dir, rel)
  elif kvstore is None and isinstance(spec.get("path"), str):  # tensorstore < 0.1.14 specs
    spec["kvstore"] = _kvstore_under(checkpoint_dir, spec.pop("path"))
  return spec


def _kvstore_under(checkpoint_dir: str, rel: str) -> Any:
  """The kvstore of ``rel`` inside ``checkpoint_dir`` (local: file driver; gs://: its bucket)."""
  m = _GS_URL.match(checkpoint_dir)
  if m is not None:
    return {"driver": "gcs", "bucket": m.group(1),
            "path": "/".join(p for p in (m.group(2).strip("/"), rel) if p)}
  if is_remote(checkpoint_dir):
    return _join(checkpoint_dir, rel)  # another URL scheme; TensorStore parses it
  return {"driver": "file", "path": os.path.join(os.path.abspath(checkpoint_dir), rel)}


def _read_tensorstore(spec: Dict[str, Any], checkpoint_dir: str, name: str) -> np.ndarray:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  full_spec = _absolute_spec(spec, checkpoint_dir)
  try:
    store = ts.open(full_spec, open=True, read=True).result()
    return np.asarray(store.read().result())
  except Exception as e:
    raise CheckpointError(
        f"checkpoint {checkpoint_dir}: cannot read parameter {name!r} with TensorStore "
        f"(kvstore {full_spec.get('kvstore')!r}): {e}") from e


def read_legacy_params(path: str) -> Dict[str, np.ndarray]:
  """Reads ``optimizer/target`` of a legacy T5X checkpoint.

  Args:
    path: the ``checkpoint`` file, its ``checkpoint_N`` directory, or a parent of
      ``checkpoint_N`` directories.

  Returns:
    ``{'/'-path: numpy array}`` in t5x parameter naming, as stored (no dtype cast).

  Raises:
    CheckpointError: if there is no checkpoint file, it is not msgpack, or it has no target.
  """
  file_path = find_legacy_checkpoint(path)
  if file_path is None:
    raise CheckpointError(f"no T5X 'checkpoint' msgpack file found at {path}")
  state = read_msgpack_state(file_path)
  target = state.get("optimizer", {}).get("target") if isinstance(state.get("optimizer"), dict) else None
  if not isinstance(target, dict):
    raise CheckpointError(
        f"{file_path} has no 'optimizer/target' parameter tree (top-level keys: "
        f"{sorted(map(str, state))})")
  checkpoint_dir = file_path.rstrip("/").rsplit("/", 1)[0] if is_remote(file_path) else (
      os.path.dirname(os.path.abspath(file_path)))
  flat: Dict[str, np.ndarray] = {}
  # TensorStore specs are dicts, so flatten only down to them.
  def visit(node: Dict[str, Any], prefix: str) -> None:
    for key, value in node.items():
      name = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, dict) and "driver" not in value:
        visit(value, name)
      elif isinstance(value, dict):
        flat[name] = _read_tensorstore(value, checkpoint_dir, name)
      else:
        flat[name] = np.asarray(value)
  visit(target, "")
  return flat


__all__ = ["find_legacy_checkpoint", "latest_step_dir", "read_legacy_params",
           "read_msgpack_state", "is_remote"]
