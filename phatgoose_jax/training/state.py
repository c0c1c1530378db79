"""Train state, Orbax checkpoints (save / resume) and the exported adapter format.

A checkpoint holds only what training changes or cannot rebuild: the trainable adapter leaves, the
frozen adapter leaves (e.g. the expert LoRA under a gate being trained; small), the optimiser state,
the step, the PRNG key and a JSON ``meta`` item (data position, best validation result so far, and
the fingerprint of the frozen base model). The base model ``params`` are never saved: a restarted
run reloads them from ``INITIAL_CHECKPOINT_PATH`` and `check_resume_meta` refuses to resume if their
fingerprint differs from the one recorded at the start of the run.

Layout under ``MODEL_DIR``::

  checkpoints/<step>/{state,meta}/    Orbax CheckpointManager items (latest ``max_to_keep`` kept)
  export/lora.safetensors             flat '<site>/<leaf>' adapter arrays of the best (or final) step
  export/metadata.json                task, rank, scale, sites, base fingerprint, step, metric

The export is what the expert library imports: keys ``'<site>/lora_a'`` [D, R], ``'<site>/lora_b'``
[R, F] and, after gate training, ``'<site>/gate'`` [D], with ``<site>`` the '/'-joined t5x path of the
projection (``encoder/layers_0/attention/query``).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

from flax import traverse_util
import jax
import numpy as np

from phatgoose_jax import fileperm
import orbax.checkpoint as ocp

EXPORT_DIR = "export"
EXPORT_WEIGHTS = "lora.safetensors"
EXPORT_METADATA = "metadata.json"
CHECKPOINT_DIR = "checkpoints"
EXPORT_FORMAT = "phatgoose_jax.adapter_export"
EXPORT_FORMAT_VERSION = 1


class ResumeError(ValueError):
  """A checkpoint in MODEL_DIR does not belong to this run's configuration."""


class ExportError(ValueError):
  """An exported adapter file is missing or malformed (names the path)."""


# --------------------------------------------------------------------------------------------------
# Splitting the adapters collection into trainable / frozen sub-trees.
# --------------------------------------------------------------------------------------------------
def flatten(tree: Mapping[str, Any]) -> Dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def split_trainable(tree: Mapping[str, Any], mask: Mapping[str, Any]) -> Tuple[dict, dict]:
  """(trainable, frozen) nested dicts holding the leaves where ``mask`` is True / False.

  Raises:
    ValueError: the mask does not have the tree's leaves, or selects nothing.
  """
  flat, flat_mask = flatten(tree), flatten(mask)
  if set(flat) != set(flat_mask):
    missing = sorted(set(flat) ^ set(flat_mask))[:3]
    raise ValueError(f"trainable_mask does not match the adapters tree (e.g. {missing})")
  trainable = {k: v for k, v in flat.items() if bool(flat_mask[k])}
  if not trainable:
    raise ValueError("trainable_mask selects no leaf: nothing to train")
  frozen = {k: v for k, v in flat.items() if not bool(flat_mask[k])}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """Inverse of `split_trainable`."""
  flat = flatten(frozen)
  flat.update(flatten(trainable))
  return unflatten(flat)


# --------------------------------------------------------------------------------------------------
# Orbax checkpoints.
# --------------------------------------------------------------------------------------------------
class Checkpointer:
  """Orbax CheckpointManager over ``MODEL_DIR/checkpoints`` with a ``state`` and a ``meta`` item."""

  def __init__(self, model_dir: str, max_to_keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINT_DIR)
    # cleanup_tmp_directories: a save killed half-way leaves an Orbax tmp directory; it is
    # removed when the run restarts (it was ignored and kept before).
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> bool:
    return self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=force)

  def restore_meta(self, step: int) -> dict:
    """The JSON ``meta`` item of ``step`` alone (checked before the state is restored)."""
    out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
    """Restores ``step`` onto ``abstract_state`` (ShapeDtypeStructs carrying shardings).

    Raises:
      ResumeError: the saved state does not fit this run's (other adapter shapes or leaves);
        the message names the checkpoint directory, not Orbax's tree dump.
    """
    try:
      out = self.manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, TypeError, KeyError) as e:
      detail = " ".join(str(e).split())
      raise ResumeError(
          f"{self.directory}: the checkpoint of step {step} cannot be restored into this run's "
          f"state (another LoRA rank, site pattern or mode, or a damaged checkpoint); use a new "
          f"MODEL_DIR. Orbax: "
          f"{detail[:300]}{'...' if len(detail) > 300 else ''}") from None
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with the arrays' shardings) for an Orbax restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_resume_meta(meta: Mapping[str, Any], base_fingerprint: Optional[str], model_dir: str,
                      run: Optional[Mapping[str, Any]] = None) -> None:
  """Refuses to resume onto a different base model, or a run whose identity changed.

  ``run`` holds the settings a resumed run must keep (e.g. mode, task, LoRA rank and scale, site
  pattern, the gate run's expert, the best-step metric and mode); the checkpoint's ``meta['run']``
  must agree on every key both have. Learning rate, TRAIN_STEPS, microbatches and dropout may
  change on resume (extend or re-tune a run), as in t5x.
  """
  saved = meta.get("base_fingerprint")
  if saved and base_fingerprint and saved != base_fingerprint:
    raise ResumeError(
        f"MODEL_DIR {model_dir} holds a run trained on base model {saved}, but "
        f"INITIAL_CHECKPOINT_PATH now has fingerprint {base_fingerprint}; use a new MODEL_DIR")
  saved_run = meta.get("run") or {}
  diffs = [f"{k}: saved {saved_run[k]!r}, now {v!r}" for k, v in sorted((run or {}).items())
           if k in saved_run and saved_run[k] != v]
  if diffs:
    raise ResumeError(f"MODEL_DIR {model_dir} holds a different run ({'; '.join(diffs)}); use a "
                      "new MODEL_DIR or the original settings")


# --------------------------------------------------------------------------------------------------
# Export / import of adapters (safetensors + JSON).
# --------------------------------------------------------------------------------------------------
def _atomic_write(path: str, write_fn) -> None:
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".tmp-")
  os.close(fd)
  try:
    write_fn(tmp)
    fileperm.ordinary_mode(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def site_names_of(flat_keys) -> list:
  """'<site>/<leaf>' keys -> sorted unique sites."""
  return sorted({k.rsplit("/", 1)[0] for k in flat_keys})


def export_adapters(model_dir: str, adapters: Mapping[str, Any], metadata: Mapping[str, Any]
                    ) -> str:
  """Writes ``MODEL_DIR/export/lora.safetensors`` and ``metadata.json`` (weights first, atomically).

  Args:
    model_dir: the run directory.
    adapters: nested adapters collection (host or device arrays).
    metadata: JSON-able fields (task, rank, scale, mode, step, base_fingerprint, ``complete``:
      false for an interim best-step export until `mark_export_complete`, ...); ``sites``,
      ``keys``, ``format`` and ``format_version`` are added.
  Returns:
    The export directory.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in
          flatten(adapters).items()}
  out_dir = os.path.join(model_dir, EXPORT_DIR)
  meta = dict(metadata)
  meta.update(format=EXPORT_FORMAT, format_version=EXPORT_FORMAT_VERSION,
              sites=site_names_of(flat), keys=sorted(flat))
  _atomic_write(os.path.join(out_dir, EXPORT_WEIGHTS), lambda p: save_file(flat, p))

  def write_json(p):
    with open(p, "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True, default=str)
  _atomic_write(os.path.join(out_dir, EXPORT_METADATA), write_json)
  return out_dir


def resolve_export(path: str) -> str:
  """A safetensors file, a directory holding ``lora.safetensors``, or a run dir with ``export/``."""
  candidates = [path, os.path.join(path, EXPORT_WEIGHTS),
                os.path.join(path, EXPORT_DIR, EXPORT_WEIGHTS)]
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise ExportError(f"no exported adapters at {path}: looked for {EXPORT_WEIGHTS} in it, "
                    f"or {EXPORT_DIR}/{EXPORT_WEIGHTS} under it")


def mark_export_complete(model_dir: str) -> None:
  """Sets ``complete: true`` in ``MODEL_DIR/export/metadata.json`` once the run has finished.

  `Trainer.fit` writes each export with ``complete: false`` while training; a run that fails or is
  killed leaves that flag, so `require_complete_export` can refuse its interim adapters."""
  path = os.path.join(model_dir, EXPORT_DIR, EXPORT_METADATA)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    meta = json.load(f)
  meta["complete"] = True

  def write_json(p):
    with open(p, "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True, default=str)
  _atomic_write(path, write_json)


def require_complete_export(meta: Mapping[str, Any], path: str) -> None:
  """Refuses an export written by a run that has not finished (``complete: false``)."""
  if meta.get("complete") is False:
    raise ExportError(f"{path}: the export is from a run that has not finished (best step "
                      f"{meta.get('step')} so far); resume the run to its last step first")


def read_export_metadata(path: str) -> dict:
  """The ``metadata.json`` beside an export's weights ({} when absent), without the weights."""
  meta_path = os.path.join(os.path.dirname(resolve_export(path)), EXPORT_METADATA)
  if not os.path.isfile(meta_path):
    return {}
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except ValueError as e:
    raise ExportError(f"{meta_path} is not valid JSON: {e}") from e
  if not isinstance(meta, dict):
    raise ExportError(f"{meta_path} must hold a JSON object")
  return meta


def load_exported_adapters(path: str) -> Tuple[dict, dict]:
  """Reads an export: returns (nested adapters dict of numpy arrays, metadata dict or {})."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  weights = resolve_export(path)
  try:
    flat = load_file(weights)
  except Exception as e:  # safetensors raises its own error types.
    raise ExportError(f"{weights} is not a readable safetensors file: {e}") from e
  meta = read_export_metadata(weights)
  bad = [k for k in flat if "/" not in k]
  if bad:
    raise ExportError(f"{weights}: keys must be '<site>/<leaf>', got {bad[:3]}")
  return unflatten(flat), meta
