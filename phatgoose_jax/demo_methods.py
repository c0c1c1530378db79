"""The demo's methods as a list of runners, their zero-shot evaluation, and the demo's outputs.

A runner is ``fn(ctx) -> list[Method]``; `METHOD_RUNNERS` lists them in table order, so adding a
baseline is a few lines: build its model and variables and append ``(label, runner)``. A runner whose
module is missing (ImportError) is skipped and reported; any other error stops the demo.

Rows (PHATGOOSE, Muqeeth et al., ICML 2024, sec. 5.1 baselines):
  * Base model; Multitask LoRA (one LoRA on the union of the expert tasks);
  * Poly / MHR rows (mean Z, -mu zero-shot; -z few-shot), Task-level MoE (router on a text task
    representation from unlabelled inputs), and DFWE (few-shot): `demo_multitask_methods`, whose
    docstring gives each protocol;
  * Expert: <task> (each single expert), and two derived rows (`methods.oracle`): Expert oracle
    (the best single expert per held-out task, chosen on the test data: an upper bound on
    per-example expert choice) and Best individual (the one expert with the best held-out average);
  * Merged experts (uniform factor average, the paper's "Merged Experts"), TIES merge (PEFT TIES
    at factor level, density 0.5, weights 1);
  * Retrieval (per-example one-hot routing by max cosine similarity to the experts' training inputs,
    hashed bag-of-words embedder, offline), Average Activation, Arrow (the variant PHATGOOSE ran);
  * LoraHub and DFWE (few-shot: `DemoConfig.fewshot_examples` labelled held-out training examples;
    not zero-shot, marked "(k-shot)" in the table);
  * PHATGOOSE (gates trained post hoc, top-k per-token routing at every site).

The single-LoRA rows (base, multitask, experts, merges, LoraHub) share one model (rank R, scale 1/R)
so they compile once; the base model is that model with ``lora_b = 0``, which adds exactly zero. A
merged LoRA's own scale is folded into its ``lora_a``.

Letters: N examples, E experts, D site input, R LoRA rank.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class MethodContext:
  """What the runners share (built by `demo.run_demo`)."""
  cfg: Any
  t5_config: Any
  params: Any
  vocab: Any
  library: Any
  run_dir: str
  experts: List[str]
  train_data: Mapping[str, List[Dict[str, Any]]]
  progress: Any
  cache: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Method:
  """One row: a model, its variables per task and optional per-example ``site_inputs``.

  Attributes:
    name: the row label.
    model: a `Transformer`.
    variables_for: task -> variables (``params`` + ``adapters``).
    site_inputs_for: (task, examples) -> per-example site inputs (leaves [N, ...]) or None.
    heldout_only: evaluate on the held-out tasks only (few-shot methods adapted per task).
    note: a short description for the report.
  """
  name: str
  model: Any
  variables_for: Callable[[str], Mapping[str, Any]]
  site_inputs_for: Optional[Callable[[str, Sequence[Mapping[str, Any]]], Any]] = None
  heldout_only: bool = False
  note: str = ""


# ------------------------------------------------------------------------------------------------
# shared models
# ------------------------------------------------------------------------------------------------
def lora_model(ctx: MethodContext):
  """The single-LoRA model (rank R, scale 1/R, every site) shared by the single-LoRA rows."""
  if "lora_model" not in ctx.cache:
    from phatgoose_jax import adapters as ad  # pylint: disable=g-import-not-at-top
    ctx.cache["lora_model"] = ad.build_model(ctx.t5_config,
                                             ad.AdapterConfig(mode="lora", rank=ctx.cfg.rank))
  return ctx.cache["lora_model"]


def routed_model(ctx: MethodContext, router: str, trace: bool = False):
  from phatgoose_jax import adapters as ad  # pylint: disable=g-import-not-at-top
  key = f"routed/{router}/{trace}"
  if key not in ctx.cache:
    ctx.cache[key] = ad.build_model(ctx.t5_config, ad.AdapterConfig(
        mode="routed", rank=ctx.cfg.rank, num_experts=len(ctx.library), top_k=ctx.cfg.top_k,
        router=router, trace=trace))
  return ctx.cache[key]


def lora_variables(ctx: MethodContext, lora: Mapping[str, Mapping[str, Any]],
                   scale: float = None) -> dict:
  """``{params, adapters}`` of the shared LoRA model for ``{site: {lora_a, lora_b}}``.

  ``scale`` (the LoRA's own multiplier; default 1/R) is folded into ``lora_a``.
  """
  from phatgoose_jax.library import to_adapters_tree  # pylint: disable=g-import-not-at-top
  factor = 1.0 if scale is None else float(scale) * ctx.cfg.rank
  tree = {s: {"lora_a": np.asarray(ab["lora_a"], np.float32) * factor,
              "lora_b": np.asarray(ab["lora_b"], np.float32)} for s, ab in lora.items()}
  return {"params": ctx.params, "adapters": to_adapters_tree(tree)}


def stacked(ctx: MethodContext, vectors: Optional[str]) -> dict:
  key = f"stacked/{vectors}"
  if key not in ctx.cache:
    ctx.cache[key] = ctx.library.stack(vectors=vectors, dtype=np.float32)
  return ctx.cache[key]


def routed_variables(ctx: MethodContext, vectors: Optional[str]) -> dict:
  from phatgoose_jax.library import to_adapters_tree  # pylint: disable=g-import-not-at-top
  st = stacked(ctx, vectors)
  if vectors is None:  # routers that ignore 'gates' still need the array.
    st = {s: dict(e, gates=np.zeros(e["lora_a"].shape[:2], np.float32)) for s, e in st.items()}
  return {"params": ctx.params, "adapters": to_adapters_tree(st)}


def _const(value):
  return lambda _task: value


# ------------------------------------------------------------------------------------------------
# runners
# ------------------------------------------------------------------------------------------------
def run_base(ctx: MethodContext) -> List[Method]:
  expert = ctx.library.load(ctx.experts[0])
  zero = {s: {"lora_a": ab["lora_a"], "lora_b": np.zeros_like(ab["lora_b"])}
          for s, ab in expert.lora.items()}
  return [Method("Base model", lora_model(ctx), _const(lora_variables(ctx, zero)),
                 note="pretrained base, no adapter (lora_b = 0)")]


def run_multitask(ctx: MethodContext) -> List[Method]:
  from phatgoose_jax.library import lora_from_adapters_tree  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  tree, meta = state_lib.load_exported_adapters(os.path.join(ctx.run_dir, "multitask"))
  lora, _ = lora_from_adapters_tree(tree)
  return [Method("Multitask LoRA", lora_model(ctx),
                 _const(lora_variables(ctx, lora, meta.get("scale"))),
                 note="one LoRA trained on the union of the expert tasks")]


def run_experts(ctx: MethodContext) -> List[Method]:
  out = []
  for name in ctx.library.names():
    e = ctx.library.load(name)
    out.append(Method(f"Expert: {name}", lora_model(ctx),
                      _const(lora_variables(ctx, e.lora, e.scale)), note="one expert alone"))
  return out


def _merged(ctx: MethodContext, name: str, method: str, note: str, **kw) -> Method:
  from phatgoose_jax import merging  # pylint: disable=g-import-not-at-top
  st = stacked(ctx, None)
  scales = next(iter(st.values()))["scale"]
  weights = None if method in ("uniform_factor", "delta_average") else np.ones_like(scales)
  merged = merging.merge_library({s: {"lora_a": e["lora_a"], "lora_b": e["lora_b"]}
                                  for s, e in st.items()}, scales, weights, method, **kw)
  lora, scale = {}, None
  for site, m in merged.items():
    scale = float(m["scale"])
    lora[site] = {"lora_a": np.asarray(m["lora_a"]) * scale * ctx.cfg.rank,
                  "lora_b": np.asarray(m["lora_b"])}
  del scale
  return Method(name, lora_model(ctx), _const(lora_variables(ctx, lora, 1.0 / ctx.cfg.rank)),
                note=note)


def run_merged(ctx: MethodContext) -> List[Method]:
  return [
      _merged(ctx, "Merged experts (uniform)", "uniform_factor",
              "mean of the A factors and of the B factors (PHATGOOSE 'Merged Experts')"),
      _merged(ctx, "TIES merge", "ties", "PEFT TIES at factor level, density 0.5, weights 1",
              density=0.5),
  ]


def run_retrieval(ctx: MethodContext) -> List[Method]:
  from phatgoose_jax.methods import retrieval  # pylint: disable=g-import-not-at-top
  embedder = retrieval.HashedBagOfWordsEmbedder(256)
  n = ctx.cfg.prototype_examples
  index = retrieval.build_index(embedder, {name: ctx.train_data[name][:n]
                                           for name in ctx.library.names()}, max_examples=n)
  retriever = retrieval.Retriever(embedder, index)
  return [Method("Retrieval", routed_model(ctx, "example_weights"),
                 _const(routed_variables(ctx, None)),
                 lambda _task, exs: {"expert_weights": retriever.expert_weights(list(exs))},
                 note="per-example one-hot expert by max cosine similarity (hashed bag of words)")]


def _expert_batches(ctx: MethodContext, name: str):
  from phatgoose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.demo import lengths  # pylint: disable=g-import-not-at-top
  rows = ctx.train_data[name][:ctx.cfg.prototype_examples]
  return pipeline.iterate_numpy_batches(rows, ctx.vocab, lengths(ctx.cfg), ctx.cfg.eval_batch)


def run_average_activation(ctx: MethodContext) -> List[Method]:
  from phatgoose_jax.methods import average_activation as aa  # pylint: disable=g-import-not-at-top
  cfg = aa.AverageActivationConfig(max_examples=ctx.cfg.prototype_examples)
  aa.compute_average_activation_vectors(ctx.library, ctx.params,
                                        lambda name: _expert_batches(ctx, name), config=cfg)
  return [Method("Average Activation", routed_model(ctx, "average_activation"),
                 _const(routed_variables(ctx, cfg.kind)),
                 note=f"PHATGOOSE router with mean site inputs as gates, top-{ctx.cfg.top_k}")]


def run_arrow(ctx: MethodContext) -> List[Method]:
  from phatgoose_jax.methods import arrow  # pylint: disable=g-import-not-at-top
  arrow.compute_arrow_vectors(ctx.library)
  return [Method("Arrow", routed_model(ctx, "arrow_phatgoose"),
                 _const(routed_variables(ctx, arrow.ARROW_KIND)),
                 note=f"top singular vectors of each expert's update, top-{ctx.cfg.top_k} "
                      "(PHATGOOSE's baseline variant)")]


def run_lorahub(ctx: MethodContext) -> List[Method]:
  from phatgoose_jax.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.demo import lengths  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.library import lora_from_adapters_tree  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import dfwe  # pylint: disable=g-import-not-at-top
  cfg = ctx.cfg
  st = stacked(ctx, None)
  per_task = {}
  for task in synthetic.SYNTHETIC_HELDOUT_TASKS:
    shots = synthetic.generate_examples(task, "train", cfg.fewshot_examples, seed=cfg.seed)
    batch = pipeline.encode_examples(shots, ctx.vocab, lengths(cfg))
    res = dfwe.lorahub(ctx.t5_config, ctx.params, st, batch,
                       dfwe.LoraHubConfig(budget=cfg.lorahub_budget, seed=42 + cfg.seed))
    lora, _ = lora_from_adapters_tree(res.adapters)
    per_task[task] = lora_variables(ctx, lora, 1.0)  # combined LoRA has scale 1.
  return [Method(f"LoraHub ({cfg.fewshot_examples}-shot)", lora_model(ctx),
                 lambda task: per_task[task], heldout_only=True,
                 note=f"factor-level combination searched (CMA-ES, {cfg.lorahub_budget} "
                      f"evaluations) on {cfg.fewshot_examples} labelled examples per task")]


def run_phatgoose(ctx: MethodContext) -> List[Method]:
  return [Method("PHATGOOSE", routed_model(ctx, "phatgoose"), _const(routed_variables(ctx, "gate")),
                 note=f"post-hoc sigmoid gates, per-token top-{ctx.cfg.top_k} routing at "
                      "every site")]


def _multitask_runner(name: str) -> Callable[[MethodContext], List[Method]]:
  """A runner of `demo_multitask_methods` (imported when run: it imports this module)."""
  def run(ctx: MethodContext) -> List[Method]:
    from phatgoose_jax import demo_multitask_methods  # pylint: disable=g-import-not-at-top
    return getattr(demo_multitask_methods, name)(ctx)
  run.__name__ = name
  return run


METHOD_RUNNERS: List[tuple] = [
    ("base", run_base),
    ("multitask", run_multitask),
    ("poly", _multitask_runner("run_poly")),
    ("mhr", _multitask_runner("run_mhr")),
    ("task_moe", _multitask_runner("run_task_moe")),
    ("experts", run_experts),
    ("merged", run_merged),
    ("retrieval", run_retrieval),
    ("average_activation", run_average_activation),
    ("arrow", run_arrow),
    ("lorahub", run_lorahub),
    ("dfwe", _multitask_runner("run_dfwe")),
    ("phatgoose", run_phatgoose),
]
ORACLE = "Expert oracle (best per task)"
BEST_INDIVIDUAL = "Best individual"


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def evaluate_method(ctx: MethodContext, method: Method, task: str,
                    examples: Sequence[Mapping[str, Any]]) -> tuple:
  """(metric name, score in %) of ``method`` on ``examples`` of ``task``."""
  from phatgoose_jax import evaluation  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import preprocessors as prep  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.evaluation import generation  # pylint: disable=g-import-not-at-top
  cfg = ctx.cfg
  variables = method.variables_for(task)
  site_inputs = method.site_inputs_for(task, examples) if method.site_inputs_for else None
  if "answer_choices" in examples[0]:
    res = evaluation.evaluate_choices(
        method.model, variables, ctx.vocab, examples,
        task_feature_lengths={"inputs": cfg.input_length, "targets": cfg.target_length},
        batch_size=cfg.eval_batch, site_inputs=site_inputs)
    return "accuracy", float(res["accuracy"])
  ids = generation.encode_texts(ctx.vocab, [ex["inputs"] for ex in examples], cfg.input_length)
  tokens = generation.generate_tokens(
      method.model, variables, generation.pad_batch(ids, cfg.input_length), cfg.target_length,
      batch_size=cfg.eval_batch, site_inputs=site_inputs, trim=False)  # [N, T]
  preds = generation.detokenize(ctx.vocab, tokens)
  return "exact_match", float(prep.exact_match_accuracy([ex["targets"] for ex in examples],
                                                        preds)["accuracy"])


def evaluate_all(ctx: MethodContext) -> Dict[str, Any]:
  """Builds every method and evaluates it; returns rows, derived rows and bookkeeping."""
  from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  cfg = ctx.cfg
  heldout = {t: synthetic.generate_examples(t, "test", cfg.eval_examples, seed=cfg.seed)
             for t in synthetic.SYNTHETIC_HELDOUT_TASKS}
  context = {t: synthetic.generate_examples(t, "validation", cfg.context_examples, seed=cfg.seed)
             for t in ctx.experts}
  rows, context_rows, notes, skipped, methods = [], [], {}, {}, []
  for label, runner in METHOD_RUNNERS:
    ctx.progress.stage(f"method {label}")
    try:
      built = runner(ctx)
    except ImportError as e:  # the method's module is not available in this checkout.
      skipped[label] = f"{type(e).__name__}: {e}"
      ctx.progress.line(f"  skipped {label}: {skipped[label]}")
      continue
    for m in built:
      notes[m.name] = m.note
      methods.append(m.name)
      scores = []
      for task, exs in heldout.items():
        metric, score = evaluate_method(ctx, m, task, exs)
        rows.append({"method": m.name, "task": task, "score": score, "metric": metric,
                     "num_examples": len(exs), "split": "test"})
        scores.append(f"{task} {score:.1f}")
      if not m.heldout_only:
        for task, exs in context.items():
          metric, score = evaluate_method(ctx, m, task, exs)
          context_rows.append({"method": m.name, "task": task, "score": score, "metric": metric,
                               "num_examples": len(exs), "split": "validation"})
      ctx.progress.line(f"  {m.name}: " + ", ".join(scores))
  rows = add_derived_rows(rows, methods)
  return {"rows": rows, "context_rows": context_rows, "notes": notes, "skipped": skipped,
          "heldout_examples": heldout, "training": dict(ctx.cache.get("training_info", {}))}


def add_derived_rows(rows: List[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
  """Adds the expert-oracle and best-individual rows (`methods.oracle`) from the single-expert rows."""
  from phatgoose_jax.methods import oracle  # pylint: disable=g-import-not-at-top
  del methods  # the rows carry their method names
  expert_rows = [r for r in rows if r["method"].startswith("Expert: ")]
  if not expert_rows:
    return rows
  tasks = list(dict.fromkeys(r["task"] for r in expert_rows))
  by = {(r["method"], r["task"]): r for r in expert_rows}
  names = list(dict.fromkeys(r["method"] for r in expert_rows))
  scores = {n: {t: by[(n, t)]["score"] for t in tasks} for n in names}
  per_task = oracle.oracle(scores, tasks)
  single = oracle.best_individual(scores, tasks)
  derived = [dict(by[(per_task.experts[t], t)], method=ORACLE,
                  chosen=per_task.experts[t][len("Expert: "):]) for t in tasks]
  derived += [dict(by[(single.expert, t)], method=BEST_INDIVIDUAL,
                   chosen=single.expert[len("Expert: "):]) for t in tasks]
  # Insert right after the last single-expert row, so the table keeps the runners' order.
  last = max(i for i, r in enumerate(rows) if r["method"].startswith("Expert: "))
  return rows[:last + 1] + derived + rows[last + 1:]


# ------------------------------------------------------------------------------------------------
# routing analysis and outputs
# ------------------------------------------------------------------------------------------------
def routing_analysis(ctx: MethodContext, examples: Sequence[Mapping[str, Any]], heatmap_path: str,
                     title: str) -> Dict[str, Any]:
  """PHATGOOSE's routing on held-out examples: per-site statistics, per-segment agreement with the
  segment's own expert, and the heatmap of example 0 (encoder sites x encoder tokens)."""
  from phatgoose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.demo import lengths  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  model = routed_model(ctx, "phatgoose", trace=True)
  variables = routed_variables(ctx, "gate")
  batch = pipeline.encode_examples(list(examples), ctx.vocab, lengths(ctx.cfg))
  trace = report.collect_routing_trace(model, variables, batch)
  names = ctx.library.names()
  stats = report.routing_statistics(trace, len(names), batch["encoder_input_tokens"] > 0,
                                    batch["decoder_loss_weights"] > 0)
  # Agreement: encoder tokens of a segment (skill word + items) routed top-1 to its expert.
  hits = total = 0
  per_site = {}
  for site, (idx, w) in trace.items():
    if not site.startswith("encoder/"):
      continue
    top1 = report.top1_experts(idx, w)  # [N, L]
    s_hits = s_total = 0
    for n, ex in enumerate(examples):
      pos = 0
      for seg_i, seg in enumerate(ex["segments"]):
        if seg_i:
          pos += 1  # the separator word
        width = 1 + len(seg["items"])
        if seg.get("expert") in names:
          e = names.index(seg["expert"])
          s_hits += int(np.sum(top1[n, pos:pos + width] == e))
          s_total += width
        pos += width
    per_site[site] = 100.0 * s_hits / max(s_total, 1)
    hits, total = hits + s_hits, total + s_total
  ex0 = batch["encoder_input_tokens"][0]
  tokens = [ctx.vocab.id_to_piece(int(t)) for t in ex0[ex0 > 0]]
  report.plot_routing_heatmap(trace, tokens, heatmap_path, example=0, side="encoder",
                              num_experts=len(names), expert_names=names, title=title)
  return {"statistics": stats, "segment_agreement_percent": 100.0 * hits / max(total, 1),
          "segment_agreement_per_site": per_site, "heatmap_example": examples[0]["inputs"],
          "heatmap_tokens": tokens, "chance_percent": 100.0 / len(names)}


def _training_markdown(training: Mapping[str, Mapping[str, Any]]) -> str:
  """One line per baseline trained inside the method stage (final train / validation loss)."""
  lines = []
  for name, info in training.items():
    if "validation_loss" in info:
      lines.append(f"- {name}: {info['steps']} steps, final training loss "
                   f"{info['final_train_loss']:.3f}, expert-task validation loss "
                   f"{info['validation_loss']:.3f}")
  return ("Training of the multitask baselines:\n\n" + "\n".join(lines) + "\n") if lines else ""


def write_outputs(ctx: MethodContext, evaluation: Mapping[str, Any],
                  extra: Mapping[str, Any]) -> Dict[str, Any]:
  """Writes ``results.json``, ``report.md`` and ``routing_heatmap.png``; returns paths and table."""
  from phatgoose_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  out = ctx.run_dir
  rows = evaluation["rows"]
  methods, tasks, table = report.results_table(rows)
  table_md = report.markdown_table(methods, tasks, table)
  c_methods, c_tasks, c_table = report.results_table(evaluation["context_rows"])
  context_md = report.markdown_table(c_methods, c_tasks, c_table)
  metric = {r["task"]: r["metric"] for r in rows}
  heldout = evaluation["heldout_examples"]
  probe_task = "compose3_gen" if "compose3_gen" in heldout else next(iter(heldout))
  probe = heldout[probe_task][:ctx.cfg.eval_batch]
  paths = {"results": os.path.join(out, "results.json"), "report": os.path.join(out, "report.md"),
           "heatmap": os.path.join(out, "routing_heatmap.png")}
  routing = routing_analysis(ctx, probe, paths["heatmap"],
                             f"PHATGOOSE top-1 expert per token ({probe_task} example)")
  chosen = {r["task"]: r.get("chosen") for r in rows if r["method"] == ORACLE}
  best = next((r.get("chosen") for r in rows if r["method"] == BEST_INDIVIDUAL), None)
  results = {
      "methods": methods, "tasks": tasks, "metric": metric, "table": table, "rows": rows,
      "context": {"methods": c_methods, "tasks": c_tasks, "table": c_table,
                  "rows": evaluation["context_rows"]},
      "method_notes": evaluation["notes"], "skipped_methods": evaluation["skipped"],
      "oracle_choice": chosen, "best_individual": best,
      "method_training": evaluation.get("training", {}),
      "expert_names": ctx.library.names(), "routing": routing, "files": paths, **dict(extra),
  }
  report.atomic_write_json(paths["results"], results)
  cfg = ctx.cfg
  notes = "\n".join(f"- **{m}**: {n}" for m, n in evaluation["notes"].items() if n)
  timings = extra.get("timings_s", {})
  md = [
      "# PHATGOOSE demo (synthetic tasks)\n",
      f"Seed {cfg.seed}; {len(ctx.library)} experts; held-out tasks evaluated zero-shot on "
      f"{cfg.eval_examples} test examples each (generative tasks: exact match %, choice task: "
      f"rank-classification accuracy %). Numbers are reported as they came out; no setting was "
      f"tuned on them.\n",
      "## Held-out tasks\n", table_md,
      f"Expert oracle picks per task: {chosen}; best individual expert: {best}.\n",
      "## Expert tasks (validation, in-distribution context)\n", context_md,
      "## Methods\n",
      f"Rows marked ({cfg.fewshot_examples}-shot) use {cfg.fewshot_examples} labelled training "
      "examples of each held-out task; '(unlabelled inputs)' uses inputs of the held-out task "
      "without their targets; every other row is zero-shot.\n",
      notes + "\n",
      _training_markdown(evaluation.get("training", {})),
      "## PHATGOOSE routing\n",
      f"On {len(probe)} `{probe_task}` test inputs, {routing['segment_agreement_percent']:.1f}% of "
      f"encoder tokens (over all encoder sites) are routed top-1 to the expert whose skill their "
      f"segment needs (chance {routing['chance_percent']:.1f}%).\n",
      f"![routing heatmap](routing_heatmap.png)\n\nHeatmap input: `{routing['heatmap_example']}`\n",
      report.routing_markdown(routing["statistics"], ctx.library.names()),
      "## Run\n",
      f"Wall time {timings.get('total', float('nan')):.1f}s, CPU time "
      f"{extra.get('cpu_time_s', float('nan')):.1f}s; stages: " +
      ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total") + "\n",
  ]
  if evaluation["skipped"]:
    md.append("Skipped methods: " + "; ".join(f"{k} ({v})" for k, v in
                                              evaluation["skipped"].items()) + "\n")
  report.atomic_write_bytes(paths["report"], "\n".join(md).encode("utf-8"))
  return {"paths": paths, "results": results, "table_markdown": table_md}
