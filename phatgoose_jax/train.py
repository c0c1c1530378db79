"""Entry point: ``python -m phatgoose_jax.train --gin_file=runs/train_expert.gin --gin.MODEL_DIR=...``.

Trains one PHATGOOSE stage on a frozen T5 loaded from ``INITIAL_CHECKPOINT_PATH``
(`phatgoose_jax.checkpoints.load_checkpoint`: T5X, HF or ours):
  * ``mode='lora'``: a LoRA expert (only ``lora_a``/``lora_b`` train) on MIXTURE_OR_TASK_NAME, or one
    LoRA on a union mixture (``runs/multitask.gin``);
  * ``mode='gated_lora'``: PHATGOOSE gate training (Muqeeth et al. 2024, Sec. 3): the expert's LoRA
    is loaded from ``expert_path`` (an expert run's MODEL_DIR, its ``export/`` or a
    ``lora.safetensors``) and frozen; only the per-site ``gate`` vectors train (100 steps, same
    optimiser settings).
At the end (and whenever validation improves) the best adapters are exported to
``MODEL_DIR/export/`` (see `phatgoose_jax.training.state`). t5x macro names are used in the gin
files: MODEL_DIR, MIXTURE_OR_TASK_NAME, MIXTURE_OR_TASK_MODULE, TASK_FEATURE_LENGTHS, BATCH_SIZE,
TRAIN_STEPS, INITIAL_CHECKPOINT_PATH, VOCABULARY.

Exit codes: 0 done; 2 configuration error (one line on stderr); 1 non-finite loss; 128+signal when
stopped by SIGTERM/SIGINT after saving a checkpoint.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Mapping, Optional

import gin
import jax
import numpy as np

from phatgoose_jax import adapters as adapters_lib
from phatgoose_jax import checkpoints
from phatgoose_jax import cpu_malloc
from phatgoose_jax import errors
from phatgoose_jax import gin_utils
from phatgoose_jax import training
# Imported before gin parsing so that their configurables (get_vocabulary, ...) are registered.
from phatgoose_jax.data import pipeline, registry, synthetic, vocab  # noqa: F401
from phatgoose_jax.models.config import T5Config
from phatgoose_jax.training import partitioning
from phatgoose_jax.training import state as state_lib
from phatgoose_jax.training.logging import MetricsLogger

MODES = ("lora", "gated_lora")
VALIDATIONS = ("token", "task")
# validation -> (default best_metric, best_mode)
VALIDATION_DEFAULTS = {"token": ("loss", "min"), "task": ("average_score", "max")}


def _load_expert_into(adapters: Mapping[str, Any], expert_path: str) -> tuple:
  """Overwrites the lora_a / lora_b leaves of ``adapters`` with an exported expert's."""
  loaded, meta = state_lib.load_exported_adapters(expert_path)
  flat, src = state_lib.flatten(adapters), state_lib.flatten(loaded)
  extra = sorted(k for k in src if k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") and k not in flat)
  if extra:
    raise ValueError(f"expert_path {expert_path}: the expert has LoRA site(s) the model lacks, "
                     f"e.g. {extra[0]!r} ({len(extra)} arrays; site_pattern mismatch?)")
  for key, value in flat.items():
    if key.rsplit("/", 1)[1] not in ("lora_a", "lora_b"):
      continue
    if key not in src:
      raise ValueError(f"expert_path {expert_path}: no {key!r} in the exported expert")
    if tuple(src[key].shape) != tuple(value.shape):
      raise ValueError(f"expert_path {expert_path}: {key} has shape {tuple(src[key].shape)}, "
                       f"the model expects {tuple(value.shape)} (rank / site_pattern mismatch?)")
    flat[key] = np.asarray(src[key], dtype=np.asarray(value).dtype)
  return state_lib.unflatten(flat), meta


def _check_expert_matches(meta: Mapping[str, Any], expert_path: str,
                          acfg: adapters_lib.AdapterConfig, fingerprint: str) -> None:
  """Gate training must use the expert's own rank, LoRA scale and base model."""
  scale = acfg.scale if acfg.scale is not None else 1.0 / acfg.rank
  checks = (("rank", meta.get("rank"), acfg.rank, "LORA_RANK / AdapterConfig.rank"),
            ("scale", meta.get("scale"), scale, "AdapterConfig.scale"),
            ("base_fingerprint", meta.get("base_fingerprint"), fingerprint,
             "INITIAL_CHECKPOINT_PATH"))
  for field, theirs, ours, flag in checks:
    if theirs is None or ours is None:
      continue  # an export without the field (e.g. imported weights): nothing to compare
    same = (np.isclose(float(theirs), float(ours), rtol=1e-6, atol=0.0) if field == "scale"
            else theirs == ours)
    if not same:
      raise ValueError(f"expert_path {expert_path}: the expert's {field} is {theirs!r}, this "
                       f"gate run has {ours!r}; set {flag} to the expert's")


def best_selection(validation: str, best_metric: Optional[str], best_mode: Optional[str]
                   ) -> tuple:
  """(metric, mode) that select the best step: the validation's defaults, and for a metric given
  without a mode, 'min' for losses and 'max' for accuracies and scores."""
  default_metric, default_mode = VALIDATION_DEFAULTS[validation]
  if best_mode is None and best_metric not in (None, default_metric):
    default_mode = "min" if "loss" in best_metric else "max"
  return best_metric or default_metric, best_mode or default_mode


def _check_paths_and_periods(model_dir: Any, initial_checkpoint_path: Any,
                             **periods: Any) -> None:
  """Refuses a bad MODEL_DIR / INITIAL_CHECKPOINT_PATH / eval_every / log_every before any work
  (the base checkpoint can take minutes to load)."""
  for macro, value in (("MODEL_DIR", model_dir),
                       ("INITIAL_CHECKPOINT_PATH", initial_checkpoint_path)):
    if not isinstance(value, str) or not value:
      raise ValueError(f"{macro} must be a non-empty path string, got {value!r}")
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise ValueError(f"MODEL_DIR {model_dir} exists and is not a directory")
  for name, value in periods.items():
    optional = name != "log_every"  # eval/checkpoint_every=None: the last step only
    if (value is None and not optional) or (value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1)):
      raise ValueError(f"train.{name} must be a positive int{' or None' if optional else ''}, "
                       f"got {value!r}")


def _check_arguments(task_feature_lengths: Any, batch_size: Any, train_steps: Any,
                     learning_rate: Any) -> None:
  """Refuses bad TASK_FEATURE_LENGTHS / BATCH_SIZE / TRAIN_STEPS / LEARNING_RATE up front."""
  if not isinstance(task_feature_lengths, Mapping) or set(task_feature_lengths) != {
      "inputs", "targets"}:
    raise ValueError(f"TASK_FEATURE_LENGTHS must be {{'inputs': L, 'targets': T}}, got "
                     f"{task_feature_lengths!r}")
  for key, value in task_feature_lengths.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"TASK_FEATURE_LENGTHS[{key!r}] must be a positive int, got {value!r}")
  for macro, value in (("BATCH_SIZE", batch_size), ("TRAIN_STEPS", train_steps)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{macro} must be a positive int, got {value!r}")
  if (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or
      not np.isfinite(learning_rate) or learning_rate <= 0):
    raise ValueError(f"train.learning_rate (LEARNING_RATE) must be a finite positive number, "
                     f"got {learning_rate!r}")


@gin.configurable(module="phatgoose_jax.train")
def train(*, model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          initial_checkpoint_path: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          mode: str = "lora", model_config: Optional[T5Config] = None,
          adapter_config: Optional[adapters_lib.AdapterConfig] = None,
          expert_path: Optional[str] = None, mixture_or_task_module: Optional[str] = None,
          vocabulary: Any = None, register_synthetic: bool = False,
          learning_rate: float = 5e-3, num_microbatches: int = 1,
          eval_split: Optional[str] = "validation", eval_every: Optional[int] = 100,
          validate_at_start: bool = True,
          checkpoint_every: Optional[int] = 100, log_every: int = 10,
          best_metric: Optional[str] = None, best_mode: Optional[str] = None,
          validation: str = "token", validation_examples: Optional[int] = None,
          eval_batch_size: Optional[int] = None, seed: int = 42, data_seed: int = 0,
          num_partitions: int = 1, base_dtype: Optional[str] = None,
          dropout_rate: Optional[float] = None,
          data_stats_examples: Optional[int] = 10000) -> training.FitResult:
  """Builds model, data and trainer from gin and runs `Trainer.fit` (see the module docstring).

  Args (beyond the t5x macros):
    mode: 'lora' (expert / multitask) or 'gated_lora' (gate training).
    model_config: forces the architecture; None reads it from the checkpoint.
    adapter_config: AdapterConfig; its ``mode`` is replaced by ``mode``.
    expert_path: the expert to gate (gate training only).
    learning_rate: peak lr (the rest of the optimiser: gin ``adamw_optimizer.*``).
    num_microbatches: gradient accumulation (BATCH_SIZE is the effective batch).
    eval_split: validation split (None: no validation; the final adapters are exported).
    validate_at_start: validate step 0 too (the expert recipe; `Trainer.fit`). Gate runs
      (runs/train_gate.gin) set it False and validate at the last step only, as the official
      ``train_gate.sh``, so the exported gate is the trained one, never the zero init.
    validation: how the best step is chosen. ``'token'``: teacher-forced token loss/accuracy on
      ``eval_split`` (default best_metric ``'loss'``, ``'min'``). ``'task'``: the task's own
      seqio metric fns on ``eval_split`` (rank-classification accuracy, exact match, ...),
      averaged as the official PHATGOOSE Evaluator does (default best_metric
      ``'average_score'``, ``'max'``, ties to the later step; `training.task_validation`).
    validation_examples: first rows of each task scored by ``validation='task'`` (None: all).
    eval_batch_size: rows per call of ``validation='task'`` (default: the per-host batch).
    best_metric / best_mode: override the validation's defaults (see ``validation``); a metric
      given without a mode is minimised if its name contains 'loss', else maximised.
    base_dtype: store the frozen base in this dtype (e.g. 'bfloat16', as the official recipe).
    dropout_rate: overrides the config's dropout.
    data_stats_examples: how many training examples `pipeline.data_statistics` reads to count
      truncated inputs/targets and dropped empty examples (0: skip); the counts go to
      MODEL_DIR/metrics.jsonl as a ``"split": "data"`` record and to the log.
  """
  if mode not in MODES:
    raise ValueError(f"train.mode must be one of {MODES}, got {mode!r}")
  if validation not in VALIDATIONS:
    raise ValueError(f"train.validation must be one of {VALIDATIONS}, got {validation!r}")
  best_metric, best_mode = best_selection(validation, best_metric, best_mode)
  if mode == "gated_lora" and not expert_path:
    raise ValueError("train.expert_path is required for gate training (mode='gated_lora')")
  _check_arguments(task_feature_lengths, batch_size, train_steps, learning_rate)
  _check_paths_and_periods(model_dir, initial_checkpoint_path, eval_every=eval_every,
                           log_every=log_every, checkpoint_every=checkpoint_every)
  if batch_size % jax.process_count():
    raise ValueError(f"BATCH_SIZE={batch_size} must be divisible by the number of hosts "
                     f"({jax.process_count()})")
  mesh = training.create_mesh(num_partitions)  # refuses a num_partitions that does not divide
  if jax.process_count() > 1 and jax.local_device_count() % num_partitions:
    # Host data shards follow process_index (not t5x's data layout): a model-parallel group must
    # not span hosts (devices are laid out host by host, num_partitions per mesh row).
    raise ValueError(f"train.num_partitions={num_partitions} does not divide the "
                     f"{jax.local_device_count()} devices of one host; on "
                     f"{jax.process_count()} hosts keep each model-parallel group within a host")
  rules = training.logical_axis_rules()
  partitioning.check_batch_rows(batch_size // jax.process_count(), mesh, rules,
                                what="BATCH_SIZE")
  errors.quiet_tensorflow_import()
  registry.import_task_module(mixture_or_task_module)
  if register_synthetic:
    if vocabulary is None:
      raise ValueError("train.register_synthetic needs VOCABULARY")
    synthetic.register_synthetic_tasks(vocabulary)
  registry.get_task_or_mixture(mixture_or_task_name)  # Unknown names fail before any model work.
  expert_file = None
  if mode == "gated_lora":  # a missing or mismatched expert fails before loading the base
    expert_file = os.path.realpath(state_lib.resolve_export(expert_path))
    early_meta = state_lib.read_export_metadata(expert_path)
    state_lib.require_complete_export(early_meta, expert_path)
    _check_expert_matches(early_meta, expert_path,
                          adapter_config or adapters_lib.AdapterConfig(), None)

  overrides = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
  config, params = checkpoints.load_checkpoint(initial_checkpoint_path, model_config,
                                               overrides or None)
  if overrides and model_config is not None:
    config = config.replace(**overrides)
  fingerprint = checkpoints.params_fingerprint(params)
  acfg = adapter_config or adapters_lib.AdapterConfig()
  acfg = adapters_lib.AdapterConfig(**{**acfg.__dict__, "mode": mode})
  model = adapters_lib.build_model(config, acfg)
  shapes = jax.eval_shape(functools.partial(adapters_lib.init_variables, model),
                          jax.random.key(seed))
  adapter_vars = jax.jit(lambda r: adapters_lib.init_variables(model, r)["adapters"])(
      jax.random.key(seed))
  adapter_vars = jax.device_get(adapter_vars)
  expert_meta = {}
  if mode == "gated_lora":
    adapter_vars, expert_meta = _load_expert_into(adapter_vars, expert_path)
    _check_expert_matches(expert_meta, expert_path, acfg, fingerprint)
  variables = {"params": params, "params_axes": shapes["params_axes"],
               "adapters": adapter_vars, "adapters_axes": shapes["adapters_axes"]}
  mask = adapters_lib.trainable_mask(adapter_vars, "lora" if mode == "lora" else "gate")

  # One schedule for the optimizer and the logged learning rate, with the gin-bound warm-up.
  opt_bindings = gin.get_bindings("phatgoose_jax.training.adamw_optimizer")
  schedule = opt_bindings.get("schedule") or training.warmup_constant_schedule(
      learning_rate, train_steps, opt_bindings.get("warmup_ratio", 0.06),
      opt_bindings.get("warmup_steps"))
  tx = training.adamw_optimizer(learning_rate=learning_rate, total_steps=train_steps,
                                schedule=schedule)
  trainer = training.Trainer(model, mask, tx, mesh, rules, num_microbatches=num_microbatches,
                             base_dtype=base_dtype, learning_rate_fn=schedule)
  state = trainer.create_state(variables, seed=seed)

  shard_id, num_shards = training.host_data_shard()
  per_host = batch_size // num_shards
  train_iter = pipeline.get_dataset(mixture_or_task_name, task_feature_lengths, "train",
                                    per_host, shuffle=True, seed=data_seed, shard_id=shard_id,
                                    num_shards=num_shards)
  if data_stats_examples and jax.process_index() == 0:
    stats = pipeline.data_statistics(mixture_or_task_name, task_feature_lengths, "train",
                                     max_examples=data_stats_examples)
    logging.info("data (first %d train examples): %s", data_stats_examples, stats)
    data_log = MetricsLogger(model_dir, train_steps, tensorboard=False, progress=False)
    data_log.write(0, "data", stats)
    data_log.close()
  eval_iter_fn = eval_fn = None
  best_ties = "first"
  if eval_split:
    provider = registry.get_task_or_mixture(mixture_or_task_name)
    if eval_split in provider.splits and validation == "task":
      if jax.process_count() > 1:
        raise ValueError("train.validation='task' runs on a single host (seqio's Evaluator is "
                         "not sharded here); use validation='token' on multi-host runs")
      eval_fn = training.make_task_eval_fn(
          trainer, mixture_or_task_name, task_feature_lengths=task_feature_lengths,
          split=eval_split, batch_size=eval_batch_size or per_host,
          num_examples=validation_examples)
      best_ties = "last"
    elif eval_split in provider.splits:
      eval_iter_fn = lambda: pipeline.get_dataset(  # pylint: disable=g-long-lambda
          mixture_or_task_name, task_feature_lengths, eval_split, per_host, shuffle=False,
          seed=0, num_epochs=1, shard_id=shard_id, num_shards=num_shards,
          drop_remainder=False)  # every row scored; `Trainer.evaluate` pads the last batch
    else:
      logging.warning("%s has no %r split: no validation, the final adapters are exported",
                      mixture_or_task_name, eval_split)
  export_meta = {
      "task": mixture_or_task_name, "mode": mode, "rank": acfg.rank,
      "scale": acfg.scale if acfg.scale is not None else 1.0 / acfg.rank,
      "site_pattern": acfg.site_pattern, "initial_checkpoint_path": initial_checkpoint_path,
      "model_config": config.to_dict(), "train_steps": train_steps, "batch_size": batch_size,
      "expert_path": expert_path, "expert_task": expert_meta.get("task"),
  }
  return trainer.fit(state, train_iter, train_steps, model_dir=model_dir,
                     eval_iter_fn=eval_iter_fn, eval_batch_size=per_host, eval_fn=eval_fn,
                     eval_every=eval_every,
                     checkpoint_every=checkpoint_every, log_every=log_every,
                     best_metric=best_metric, best_mode=best_mode, best_ties=best_ties,
                     validate_at_start=validate_at_start,
                     run_identity={"mode": mode, "mixture_or_task_name": mixture_or_task_name,
                                   "rank": acfg.rank, "scale": export_meta["scale"],
                                   "site_pattern": acfg.site_pattern,
                                   "expert_path": expert_file},  # the resolved weights file
                     base_fingerprint=fingerprint,
                     export_metadata=export_meta)


def main(argv) -> int:
  cpu_malloc.configure_from_env()  # PHATGOOSE_JAX_MALLOC=heap: see phatgoose_jax/cpu_malloc.py
  files, bindings, paths, rest = gin_utils.split_flags(argv)
  multihost = None
  for arg in rest:
    if arg in ("--multihost", "--multihost=true"):
      multihost = True
    elif arg == "--multihost=false":
      multihost = False
    else:
      raise gin_utils.GinConfigError(f"unknown flag {arg!r} (expected --gin_file, --gin.NAME=VALUE, "
                                     "--gin_bindings, --gin_search_paths, --multihost)")
  training.maybe_initialize_distributed(multihost)
  gin_utils.parse_gin(files, bindings, paths)
  try:
    result = train()  # pylint: disable=no-value-for-parameter
  except RuntimeError as e:
    if "Required bindings" in str(e):
      raise gin_utils.GinConfigError(gin_utils.one_line(e)) from None
    raise
  except training.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if result.interrupted is not None:
    return 128 + int(result.interrupted)
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
