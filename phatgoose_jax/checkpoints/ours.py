"""phatgoose_jax's own base-model checkpoints: Orbax params + JSON config, written atomically.

Layout of a checkpoint directory:
  * ``phatgoose_config.json``: exactly ``T5Config.to_dict()``;
  * ``phatgoose_metadata.json``: ``{'format': 'phatgoose_jax.params', 'format_version': 1,
    'step': int | null, 'fingerprint': <params_fingerprint>, 'extra_metadata': {...}}``;
  * ``params/``: an Orbax ``PyTreeCheckpointer`` item holding the t5x-named parameter tree.

The directory is first written under a temporary sibling name and then renamed into place, so a
reader never sees a half-written checkpoint (a crash leaves only a ``.<name>.tmp-*`` sibling).

``params_fingerprint`` identifies a parameter tree by content; the expert library records it to
tie each expert to the base model it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from phatgoose_jax import fileperm
from phatgoose_jax.checkpoints.shapes import (CheckpointError, check_param_shapes, flatten_params,
                                              shapes_of, unflatten_params)
from phatgoose_jax.models.config import T5Config

CONFIG_FILE = "phatgoose_config.json"
METADATA_FILE = "phatgoose_metadata.json"
PARAMS_DIR = "params"
FORMAT = "phatgoose_jax.params"
FORMAT_VERSION = 1


def is_our_checkpoint(path: str) -> bool:
  """True if ``path`` is a directory written by :func:`save_checkpoint`."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def params_fingerprint(params: Mapping[str, Any]) -> str:
  """A stable sha256 over a parameter tree's content.

  Hashes, for every leaf in sorted ``'/'``-path order: the path, the shape, the dtype name and
  the little-endian C-order bytes, each length-prefixed so that no two trees collide by
  concatenation. Independent of dict insertion order and of jax vs numpy arrays.

  Args:
    params: nested dict (or flat ``'/'``-path dict) of arrays.

  Returns:
    ``'sha256:<64 hex digits>'``.
  """
  flat = flatten_params(params)
  digest = hashlib.sha256()

  def put(data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)

  for path in sorted(flat):
    array = np.asarray(flat[path])
    put(path.encode("utf-8"))
    put(json.dumps([int(s) for s in array.shape]).encode("utf-8"))
    put(array.dtype.name.encode("utf-8"))
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    put(np.ascontiguousarray(little).tobytes())
  return "sha256:" + digest.hexdigest()


def save_checkpoint(directory: str,
                    params: Mapping[str, Any],
                    config: T5Config,
                    step: Optional[int] = None,
                    extra_metadata: Optional[Dict[str, Any]] = None,
                    overwrite: bool = False) -> str:
  """Writes ``params`` and ``config`` to ``directory`` atomically.

  Args:
    directory: target directory; must not exist unless ``overwrite``.
    params: nested t5x parameter tree (numpy or jax arrays); checked against ``config`` and
      stored in ``config.param_dtype``.
    config: the model configuration, stored as ``phatgoose_config.json``.
    step: optional training step, recorded in the metadata.
    extra_metadata: optional JSON-serialisable dict, recorded in the metadata.
    overwrite: replace an existing checkpoint at ``directory``.

  Returns:
    The fingerprint of the saved parameters.

  Raises:
    CheckpointError: if the params do not match the config, or ``directory`` exists.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.fspath(directory))
  # Stored in config.param_dtype, which is what `load_checkpoint` returns, so the recorded
  # fingerprint is that of the loaded parameters whatever dtype they arrived in.
  dtype = np.dtype(config.params_dtype)
  flat = {k: np.asarray(v).astype(dtype, copy=False) for k, v in flatten_params(params).items()}
  check_param_shapes(shapes_of(flat), config, directory)
  if os.path.exists(directory) and not overwrite:
    raise CheckpointError(f"checkpoint directory {directory} already exists (pass overwrite=True)")
  fingerprint = params_fingerprint(flat)
  metadata = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "step": None if step is None else int(step),
      "fingerprint": fingerprint,
      "extra_metadata": dict(extra_metadata or {}),
  }
  try:
    metadata_text = json.dumps(metadata, indent=2, sort_keys=True)
  except TypeError as e:
    raise CheckpointError(f"extra_metadata for {directory} is not JSON-serialisable: {e}") from e

  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    ocp.PyTreeCheckpointer().save(os.path.join(tmp, PARAMS_DIR), unflatten_params(flat))
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
      f.write(metadata_text)
    fileperm.ordinary_mode(tmp)
    if os.path.exists(directory):  # overwrite: move the old one aside, then swap.
      trash = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      old = os.path.join(trash, name)
      os.replace(directory, old)
      try:
        os.replace(tmp, directory)
      except BaseException:
        os.replace(old, directory)  # the swap failed: put the old checkpoint back
        shutil.rmtree(trash, ignore_errors=True)
        raise
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return fingerprint


def read_metadata(directory: str) -> Dict[str, Any]:
  """The ``phatgoose_metadata.json`` of a checkpoint (step, fingerprint, extra_metadata)."""
  path = os.path.join(directory, METADATA_FILE)
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read checkpoint metadata {path}: {e}") from e


def read_our_checkpoint(directory: str) -> Tuple[T5Config, Dict[str, np.ndarray]]:
  """Reads a checkpoint written by :func:`save_checkpoint`.

  Returns:
    ``(config from phatgoose_config.json, {'/'-path: numpy array})``, values as stored.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(config_path, "r", encoding="utf-8") as f:
      config = T5Config.from_dict(json.load(f))
  except (OSError, TypeError, ValueError) as e:
    raise CheckpointError(f"cannot read T5 config {config_path}: {e}") from e
  params_dir = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"checkpoint {directory} has no '{PARAMS_DIR}/' Orbax item")
  try:
    restored = ocp.PyTreeCheckpointer().restore(params_dir)
  except Exception as e:
    raise CheckpointError(f"cannot restore Orbax params {params_dir}: {e}") from e
  return config, {k: np.asarray(v) for k, v in flatten_params(restored).items()}


__all__ = ["is_our_checkpoint", "params_fingerprint", "read_metadata", "read_our_checkpoint",
           "save_checkpoint"]
