"""Evaluation entry point: ``python -m phatgoose_jax.eval --gin_file=... [--gin.MACRO=value]``.

Gin-driven like t5x's ``eval.py``. Gin files are applied in order, so pass a model preset first, then
``runs/eval.gin``, then a router (``routers/phatgoose.gin``, ...), then overrides::

  python -m phatgoose_jax.eval --gin_file=models/t5_1_1_lm100k_xl.gin --gin_file=runs/eval.gin \\
    --gin_file=routers/phatgoose.gin --gin.MIXTURE_OR_TASK_NAME='"t0_heldout"' \\
    --gin.LIBRARY_PATH='"/data/library"' --gin.EVAL_OUTPUT_DIR='"/tmp/eval"'

Steps: import ``MIXTURE_OR_TASK_MODULE``; load the base checkpoint (`phatgoose_jax.load_checkpoint`,
any supported format); with ``LIBRARY_PATH``, stack the library's experts (router vectors of the
kind the router file names) into a routed model built from the gin-bound ``AdapterConfig``; run
``seqio.Evaluator`` on every sub-task (`evaluation.run_seqio_evaluation`); write ``results.json`` /
``report.md`` (plus routing statistics and a heatmap when ``ROUTING_TRACE_EXAMPLES`` > 0) to
``EVAL_OUTPUT_DIR``. Errors are one line on stderr with exit status 2.

No tensors here, so no einsum letters are used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import gin
import jax
import numpy as np

from phatgoose_jax import cpu_malloc
from phatgoose_jax import gin_utils
from phatgoose_jax.adapters import AdapterConfig, build_model
from phatgoose_jax.models.config import T5Config

TRACED_ROUTERS = ("phatgoose", "average_activation", "arrow", "arrow_phatgoose")
VECTORLESS_ROUTERS = ("uniform", "example_weights")


class EvalConfigError(ValueError):
  """A gin-configured evaluation argument is missing or invalid."""


def _require(value: Any, macro: str) -> Any:
  if value is gin.REQUIRED or value is None or value == "":
    raise EvalConfigError(f"{macro} is not set (e.g. --gin.{macro}=...)")
  return value


def _adapters(library_path: Optional[str], experts: Optional[Sequence[str]],
              vectors: Optional[str], config: Optional[T5Config] = None,
              params: Optional[dict] = None):
  """(AdapterConfig, adapters tree, expert names) for a library, or mode 'none' without one.

  The routed config is the gin-bound ``AdapterConfig`` (router files) with ``num_experts`` = E.
  With ``params`` / ``config`` (the loaded base model), a library built for another base model
  (fingerprint) or architecture (site dims) is refused, naming the field.
  """
  if not library_path:
    return AdapterConfig(mode="none"), {}, []
  from phatgoose_jax.library import ExpertLibrary, LibraryError, site_shapes, to_adapters_tree  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(library_path):
    raise EvalConfigError(f"LIBRARY_PATH {library_path!r} is not a directory")
  lib = ExpertLibrary.open(library_path)
  if config is not None and site_shapes(lib.t5_config) != site_shapes(config):
    raise LibraryError(f"library {library_path}: field 't5_config' gives LoRA site dims that "
                       "differ from the model of CHECKPOINT_PATH")
  if params is not None:
    from phatgoose_jax.checkpoints import params_fingerprint  # pylint: disable=g-import-not-at-top
    fingerprint = params_fingerprint(params)
    if fingerprint != lib.base_fingerprint:
      raise LibraryError(f"library {library_path}: field 'base_fingerprint' is "
                         f"{lib.base_fingerprint}, but CHECKPOINT_PATH has {fingerprint}")
  names = list(experts) if experts else lib.names()
  stacked = lib.stack(names, vectors=vectors)  # an empty library: the named error first
  cfg = AdapterConfig(mode="routed", num_experts=len(names))
  if vectors is None and cfg.router not in VECTORLESS_ROUTERS:
    raise EvalConfigError(f"router {cfg.router!r} routes by library vectors, but "
                          "evaluate.router_vectors is None (use its routers/*.gin file)")
  if vectors is None:  # 'uniform' / 'example_weights' read no vectors, but every routed site
    for leaves in stacked.values():  # declares [E, D] gates: unused zeros stand in
      if "gates" not in leaves:
        a = leaves["lora_a"]
        leaves["gates"] = np.zeros(a.shape[:2], a.dtype)
  return cfg, to_adapters_tree(stacked), names


def _routing_report(model_config: T5Config, adapter_config: AdapterConfig, variables: dict,
                    task_name: str, lengths: dict, split: str, num: int, out_dir: str,
                    expert_names: Sequence[str]) -> dict:
  """Routing statistics + heatmap on the first ``num`` examples of ``task_name``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import pipeline, registry  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  batch = next(iter(pipeline.get_dataset(task_name, lengths, split, batch_size=num, shuffle=False,
                                         num_epochs=1, drop_remainder=False)))
  tracing = build_model(model_config, dataclasses.replace(adapter_config, trace=True))
  trace = report.collect_routing_trace(tracing, variables, batch)
  stats = report.routing_statistics(trace, adapter_config.num_experts,
                                    encoder_mask=batch["encoder_input_tokens"] > 0,
                                    decoder_mask=batch["decoder_target_tokens"] > 0)
  provider = registry.get_task_or_mixture(task_name)
  vocab = provider.output_features["inputs"].vocabulary
  ids = [int(t) for t in np.asarray(batch["encoder_input_tokens"][0]) if t > 0]
  tokens = [vocab.decode([t]) if t != 1 else "</s>" for t in ids]
  report.plot_routing_heatmap(trace, tokens, os.path.join(out_dir, "routing_heatmap.png"),
                              num_experts=adapter_config.num_experts, expert_names=expert_names,
                              title=f"{task_name}: top-1 expert per token")
  return stats


# The number a report shows per task: accuracy where there is one, ROUGE-L for ROUGE tasks (the
# only ROUGE type PHATGOOSE reports, official src/data/metrics.py), else the first by name.
_HEADLINE_ORDER = ("accuracy", "rougeL", "rougeLsum")


def _headline_metric(numeric: Mapping[str, float]) -> str:
  for key in _HEADLINE_ORDER:
    if key in numeric:
      return key
  return sorted(numeric)[0]


@gin.configurable(module="phatgoose_jax.eval")
def evaluate(mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: dict = gin.REQUIRED,
             initial_checkpoint_path: str = gin.REQUIRED,
             eval_output_dir: str = gin.REQUIRED,
             library_path: Optional[str] = None,
             experts: Optional[Sequence[str]] = None,
             router_vectors: Optional[str] = "gate",
             method_name: str = "model",
             task_module: Optional[Any] = None,
             split: str = "validation",
             batch_size: int = 32,
             num_examples: Optional[int] = None,
             length_normalize: bool = True,
             t5_config: Optional[T5Config] = None,
             routing_trace_examples: int = 0,
             num_partitions: int = 1) -> dict:
  """Evaluates a base model or a routed expert library on a seqio task/mixture.

  On several devices (one host) the base parameters and the library are placed on a ``('data',
  'model')`` mesh by the logical-axis rules and the steps run under it
  (`evaluation.placement`): batches split over ``data``, kernels (and a library's experts) as in
  training.

  Args:
    mixture_or_task_name: MIXTURE_OR_TASK_NAME.
    task_feature_lengths: TASK_FEATURE_LENGTHS, {'inputs': L, 'targets': T}.
    initial_checkpoint_path: CHECKPOINT_PATH (T5X legacy/Orbax, HF, or ours; `runs/eval.gin`
      defaults it to the preset's INITIAL_CHECKPOINT_PATH).
    eval_output_dir: EVAL_OUTPUT_DIR for results.json / report.md / routing_heatmap.png.
    library_path: LIBRARY_PATH of an expert library; None evaluates the base model.
    experts: subset of library experts (E order); None = all.
    router_vectors: the library vector kind used as router vectors (set by the router gin file).
    method_name: the method's row label in the report.
    task_module: MIXTURE_OR_TASK_MODULE, imported first.
    split: eval split.
    batch_size: rows per call.
    num_examples: optional cap of examples per task.
    length_normalize: rank-classification score = mean (True) or summed log-likelihood.
    t5_config: model config to check the checkpoint against (default: the checkpoint's).
    routing_trace_examples: > 0 writes routing statistics and a heatmap from that many examples of
      the first task (top-k routers only).
    num_partitions: NUM_PARTITIONS, the mesh's ``model`` axis (t5x's ``num_partitions``).

  Returns:
    {task: metrics}.
  """
  from phatgoose_jax import load_checkpoint  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import registry  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.evaluation import evaluator, report  # pylint: disable=g-import-not-at-top
  name = _require(mixture_or_task_name, "MIXTURE_OR_TASK_NAME")
  lengths = _require(task_feature_lengths, "TASK_FEATURE_LENGTHS")
  if not isinstance(lengths, dict) or set(lengths) != {"inputs", "targets"}:
    raise EvalConfigError(f"TASK_FEATURE_LENGTHS must be {{'inputs': L, 'targets': T}}, got "
                          f"{lengths!r}")
  ckpt = _require(initial_checkpoint_path, "CHECKPOINT_PATH")
  out_dir = _require(eval_output_dir, "EVAL_OUTPUT_DIR")
  if "://" not in str(out_dir):  # checked before the (long) evaluation, not after it
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
      raise EvalConfigError(f"EVAL_OUTPUT_DIR {out_dir} exists and is not a directory")
    existing = os.path.abspath(out_dir)  # nothing is created until the results are written
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
      raise EvalConfigError(f"EVAL_OUTPUT_DIR {out_dir} cannot be written ({existing} is not a "
                            "writable directory)")
  from phatgoose_jax import errors  # pylint: disable=g-import-not-at-top
  errors.quiet_tensorflow_import()
  registry.import_task_module(task_module)
  provider = registry.get_task_or_mixture(name)
  config, params = load_checkpoint(ckpt, t5_config)
  adapter_config, adapters, expert_names = _adapters(library_path, experts, router_vectors,
                                                     config, params)
  if adapter_config.mode == "routed" and method_name == "base":  # a library, no router file
    method_name = adapter_config.router
  model = build_model(config, adapter_config)
  variables = {"params": params, "adapters": adapters}
  scope = contextlib.nullcontext()
  if jax.device_count() > 1 or num_partitions != 1:  # a mesh: params and library sharded
    from phatgoose_jax.evaluation import placement  # pylint: disable=g-import-not-at-top
    from phatgoose_jax.training import partitioning  # pylint: disable=g-import-not-at-top
    variables, mesh, rules = placement.place_for_evaluation(model, variables, num_partitions)
    scope = partitioning.partitioning_scope(mesh, rules)
  with scope:
    metrics = evaluator.run_seqio_evaluation(name, model, variables,
                                             task_feature_lengths=lengths, split=split,
                                             batch_size=batch_size, num_examples=num_examples,
                                             length_normalize=length_normalize)
  rows = []
  for task, values in metrics.items():
    numeric = {k: v for k, v in values.items() if isinstance(v, float)}
    if not numeric:
      continue
    key = _headline_metric(numeric)
    rows.append({"method": method_name, "task": task, "score": numeric[key], "metric": key,
                 "metrics": numeric})
  stats = None
  if routing_trace_examples > 0 and adapter_config.mode == "routed" and (
      adapter_config.router in TRACED_ROUTERS):
    first = [t.name for t in getattr(provider, "tasks", [provider])][0]
    stats = _routing_report(
        config, adapter_config, variables, first, dict(lengths), split, routing_trace_examples,
        out_dir, expert_names)
  if rows and jax.process_index() == 0:  # one writer on several hosts
    report.write_report(out_dir, rows, routing_stats=stats, expert_names=expert_names or None,
                        title=f"{method_name} on {name} ({split})",
                        extra={"mixture_or_task_name": name, "checkpoint": ckpt,
                               "library_path": library_path, "router": adapter_config.router
                               if adapter_config.mode == "routed" else None})
  return metrics


EVAL_ROUTER_FILES = ("phatgoose", "average_activation", "arrow", "arrow_phatgoose",
                     "uniform_merge", "single_expert")


def refuse_method_configs() -> None:
  """Refuses a config that binds `phatgoose_jax.methods` configurables: those router files
  (merged, polytropon, mhr, task_moe, dfwe, lorahub, retrieval, average_activation_build)
  configure the methods' Python API and the demo; this entry point would silently ignore them
  and report its own routing under their name."""
  bound = sorted({selector for (_, selector) in gin.config._CONFIG  # pylint: disable=protected-access
                  if selector.startswith("phatgoose_jax.methods.")})
  if bound:
    raise EvalConfigError(
        f"the gin files bind {', '.join(bound)}: that router file configures a method of "
        "phatgoose_jax.methods (Python API, `phatgoose-jax demo`), which phatgoose_jax.eval does "
        "not run; eval runs " + ", ".join(f"routers/{r}.gin" for r in EVAL_ROUTER_FILES))


def parse_flags(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """(gin files, bindings, search paths) from t5x-style flags (`gin_utils.split_flags`)."""
  files, bindings, paths, rest = gin_utils.split_flags(argv)
  if rest:
    raise EvalConfigError(f"unknown flag {rest[0]!r} (use --gin_file, --gin_bindings, --gin.X=Y)")
  if not files:
    raise EvalConfigError("no --gin_file given (e.g. --gin_file=runs/eval.gin)")
  return files, bindings, paths


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if any(a in ("-h", "--help") for a in argv):  # the module docstring is the usage
    print(__doc__.strip())
    return 0
  try:
    cpu_malloc.configure_from_env()  # PHATGOOSE_JAX_MALLOC=heap: see phatgoose_jax/cpu_malloc.py
    files, bindings, paths = parse_flags(argv)
    gin_utils.import_configurable_modules()  # so method router files parse, then are refused
    gin_utils.parse_gin(files, bindings, paths, finalize=False)
    refuse_method_configs()
    metrics = evaluate()
  except Exception as e:  # one line, no traceback  # pylint: disable=broad-except
    from phatgoose_jax.errors import clean_message  # pylint: disable=g-import-not-at-top
    msg = " ".join(clean_message(e).split())
    print(f"phatgoose_jax.eval: error: {type(e).__name__}: {msg}", file=sys.stderr)
    return 2
  for task, values in metrics.items():
    print(f"{task}: {values}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
