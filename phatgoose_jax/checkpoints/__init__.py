"""Loading base T5 checkpoints in any supported format into t5x's parameter tree.

``load_checkpoint(path)`` detects the format:
  * phatgoose_jax's own (``phatgoose_config.json`` + Orbax ``params/``; see ``ours.py``);
  * Hugging Face T5 (``config.json`` + ``model.safetensors`` or a sharded index; ``hf.py``);
  * legacy T5X (``checkpoint`` msgpack + TensorStore arrays; ``t5x_legacy.py``);
  * Orbax T5X (``checkpoint_N/state`` PyTree item, OCDBT; ``t5x_orbax.py``);
  * a T5X run directory holding ``checkpoint_N/`` sub-directories (the highest N is loaded).
and returns ``(T5Config, params)`` with ``params`` a nested dict of numpy arrays in t5x naming
(``params['encoder']['layers_0']['attention']['query']['kernel']``), cast to the config's
``param_dtype``. Only model parameters are read, never optimizer state.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from phatgoose_jax.checkpoints.hf import is_hf_folder, read_hf_folder
from phatgoose_jax.checkpoints.ours import (is_our_checkpoint, params_fingerprint, read_metadata,
                                            read_our_checkpoint, save_checkpoint)
from phatgoose_jax.checkpoints.shapes import (CheckpointError, check_param_shapes,
                                              expected_param_shapes, flatten_params, infer_config,
                                              shapes_of, unflatten_params)
from phatgoose_jax.checkpoints.t5x_legacy import is_remote, latest_step_dir, read_legacy_params
from phatgoose_jax.checkpoints.t5x_orbax import read_orbax_pytree
from phatgoose_jax.models.config import T5Config

FORMATS = ("phatgoose_jax", "hf", "t5x_legacy", "t5x_orbax")

_LOOKED_FOR = (
    "phatgoose_config.json (phatgoose_jax), config.json + model.safetensors[.index.json] (HF T5), "
    "a 'checkpoint' msgpack file (legacy T5X), state/_METADATA (Orbax T5X), or checkpoint_N/ "
    "sub-directories holding one of these")


def _remote_format(path: str) -> Tuple[str, str]:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  stripped = path.rstrip("/")
  if stripped.endswith("/checkpoint"):
    return "t5x_legacy", stripped
  if stripped.endswith("/state"):
    return "t5x_orbax", stripped
  kv = ts.KvStore.open(stripped + "/").result()
  if kv.read("checkpoint").result().state == "value":
    return "t5x_legacy", stripped
  if kv.read("state/_METADATA").result().state == "value":
    return "t5x_orbax", stripped
  raise CheckpointError(f"{path} is not a checkpoint: looked for {_LOOKED_FOR}")


def detect_format(path: str) -> Tuple[str, str]:
  """Returns ``(format, resolved path)`` for a checkpoint path; format is one of ``FORMATS``.

  Raises:
    CheckpointError: naming ``path`` and what was looked for, if it is no checkpoint.
  """
  path = os.fspath(path)
  if is_remote(path):
    return _remote_format(path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if os.path.isfile(path):
    name, directory = os.path.basename(path), os.path.dirname(os.path.abspath(path))
    if name == "phatgoose_config.json" and is_our_checkpoint(directory):
      return "phatgoose_jax", directory
    if name in ("config.json", "model.safetensors", "model.safetensors.index.json") and (
        is_hf_folder(directory)):
      return "hf", directory
    return "t5x_legacy", path  # Any other file must be a T5X msgpack checkpoint.
  if is_our_checkpoint(path):
    return "phatgoose_jax", path
  if is_hf_folder(path):
    return "hf", path
  if os.path.isfile(os.path.join(path, "checkpoint")):
    return "t5x_legacy", path
  if os.path.isfile(os.path.join(path, "_METADATA")) or os.path.isfile(
      os.path.join(path, "state", "_METADATA")):
    return "t5x_orbax", path
  step_dir = latest_step_dir(path)
  if step_dir is not None:
    try:
      return detect_format(step_dir)
    except CheckpointError:
      pass
  raise CheckpointError(f"{path} is not a checkpoint: looked for {_LOOKED_FOR}")


def load_checkpoint(path: str,
                    config: Optional[T5Config] = None,
                    config_overrides: Optional[Dict[str, Any]] = None,
                    ) -> Tuple[T5Config, Dict[str, Any]]:
  """Loads a T5 checkpoint of any supported format.

  Args:
    path: a checkpoint directory or file (see the module docstring), local or ``gs://``.
    config: if given, every array is checked against ``expected_param_shapes(config)`` and this
      config is returned. If None, the config comes from the checkpoint (our JSON, HF
      ``config.json``) or is inferred from the T5X shapes (``infer_config``).
    config_overrides: T5Config fields replacing read/inferred ones (e.g. ``dropout_rate``,
      ``dtype``, or ``mlp_activations`` when shapes cannot tell); ignored when ``config`` is given.

  Returns:
    ``(config, params)``: params is a nested dict of numpy arrays of ``config.param_dtype``.

  Raises:
    CheckpointError: the path is no checkpoint, or a parameter is missing, unexpected, shaped
      differently from the config, or non-finite (the message names the path and the parameter).
  """
  if config is not None and not isinstance(config, T5Config):
    raise TypeError(f"config must be a T5Config or None, got {type(config).__name__}")
  fmt, resolved = detect_format(path)
  stored_config: Optional[T5Config] = None
  if fmt == "phatgoose_jax":
    stored_config, flat = read_our_checkpoint(resolved)
  elif fmt == "hf":
    stored_config, flat = read_hf_folder(resolved)
  elif fmt == "t5x_legacy":
    flat = read_legacy_params(resolved)
  else:
    flat = read_orbax_pytree(resolved, prefix="target")

  shapes = shapes_of(flat)
  overrides = dict(config_overrides or {})
  if config is None:
    if stored_config is not None:
      try:
        config = stored_config.replace(**overrides)
      except (TypeError, ValueError) as e:
        raise CheckpointError(f"config_overrides for {path}: {e}") from e
    else:
      config = infer_config(shapes, **overrides)
  check_param_shapes(shapes, config, str(path))
  dtype = np.dtype(config.params_dtype)
  flat = {k: np.array(v, dtype=dtype) for k, v in flat.items()}  # Owned, writable copies.
  for name in sorted(flat):
    if not np.all(np.isfinite(flat[name].astype(np.float32))):
      raise CheckpointError(f"checkpoint {path}: parameter {name} contains non-finite values "
                            "(NaN/inf); refusing to train or evaluate on it")
  return config, unflatten_params(flat)


__all__ = [
    "CheckpointError", "FORMATS", "check_param_shapes", "detect_format", "expected_param_shapes",
    "flatten_params", "infer_config", "load_checkpoint", "params_fingerprint", "read_metadata",
    "save_checkpoint", "unflatten_params",
]
