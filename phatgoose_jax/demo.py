"""The embedded CPU demo: the whole PHATGOOSE pipeline on synthetic tasks, in minutes.

``phatgoose-jax demo`` (or ``python -m phatgoose_jax.demo``) runs, deterministically given
``--seed``:

  1. a SentencePiece vocabulary trained on `data.synthetic.synthetic_corpus` (T5 ids; every word of
     the synthetic lexicon is one piece, so the routing heatmap shows one column per word);
  2. a small T5.1.1 (`DemoConfig`: 64-wide, 2 + 2 layers) pretrained briefly, all parameters, on
     the same corpus with a mix of prefix-LM and word-deletion denoising (T5-style text-to-text
     objectives; no task solutions are in the corpus), saved with `checkpoints.save_checkpoint`;
  3. one LoRA expert per synthetic expert task (`training.Trainer`, adapter mode 'lora', only
     ``lora_a``/``lora_b`` train), then its PHATGOOSE gate (mode 'gated_lora', only ``gate`` trains,
     LoRA frozen; Muqeeth et al., ICML 2024, sec. 3), both added to an `library.ExpertLibrary`;
  4. a multitask LoRA on the union of the expert tasks' training data;
  5. evaluation of every method of `demo_methods.METHOD_RUNNERS` on the held-out tasks
     (compositions of 2-3 expert skills in one input: each segment's tokens need a different
     expert; generative exact match and rank classification), plus the expert tasks' validation
     split for context; zero-shot unless the row says "(k-shot)" or "(unlabelled inputs)";
     Poly / MHR / task-level MoE train on the union inside their method stage
     (`demo_multitask_methods`);
  6. the table (markdown, printed), ``report.md``, ``results.json`` and ``routing_heatmap.png``
     (PHATGOOSE's top-1 expert per encoder token per encoder site for one held-out example, as the
     paper's routing analysis, sec. 5.3) in the run folder.

Nothing is tuned on the evaluation data: every setting is fixed in `DemoConfig` before any
evaluation, and the numbers are reported as they come out.

Letters: B batch, L encoder length, T target length.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import gin
import numpy as np

from phatgoose_jax.demo_base import build_vocabulary, pretrain_base

# Run-folder entries the demo owns (cleared at the start of a run so that the trainer never
# resumes from a previous run's checkpoints).
_OWNED = ("vocab", "base", "experts", "gates", "multitask", "library", "methods")


class DemoError(ValueError):
  """Bad demo arguments (names the flag)."""


def _gin_configurable(cls):
  # `python -m phatgoose_jax.demo` runs this file as __main__, and the CLI then imports it again as
  # phatgoose_jax.demo: only the package module registers with gin (no duplicate registration).
  return cls if __name__ == "__main__" else gin.configurable(module="phatgoose_jax.demo")(cls)


@_gin_configurable
@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Every size and setting of the demo (fixed before any evaluation).

  Attributes:
    seed: the one seed (data order, initialisation, dropout-free training, few-shot draws).
    corpus_lines: lines of `synthetic_corpus` (vocabulary and pretraining text).
    vocab_pieces: requested SentencePiece pieces (the lexicon gives ~86).
    vocab_size: rows of the embedding (>= pieces; padded to a multiple of 8).
    emb_dim, num_heads, head_dim, mlp_dim, num_encoder_layers, num_decoder_layers: the T5.1.1.
    input_length, target_length: L and T of every batch.
    pretrain_steps, pretrain_batch, pretrain_lr: full-parameter pretraining (AdamW, warmup).
    train_examples: training examples generated per expert task.
    expert_steps, expert_batch, expert_lr: LoRA expert training (PHATGOOSE lr 5e-3).
    gate_steps: gate training steps (same optimiser; PHATGOOSE: 100).
    multitask_steps: steps of the multitask LoRA (batch ``expert_batch``).
    rank: LoRA rank R (scale 1/R, the official convention).
    top_k: K of the top-k routers.
    eval_examples: test examples per held-out task.
    context_examples: validation examples per expert task (in-distribution context table).
    fewshot_examples: labelled held-out training examples given to the few-shot methods.
    lorahub_budget: LoraHub loss evaluations (official 40).
    prototype_examples: training examples per expert for Average Activation / Retrieval.
    eval_batch: examples per evaluation call.
    poly_skills, poly_rank: Poly / MHR inventory: K skills of rank R_poly (<= rank).
    mhr_heads: H of MHR (must divide every site's input and output width).
    poly_steps, poly_lr, poly_z_lr: multitask Poly / MHR training (batch ``expert_batch``; skills
      lr, routing-logits lr as mttl's 0.1).
    poly_adapt_steps: steps of the few-shot Z-row training (Poly-z / MHR-z).
    task_moe_experts, task_moe_steps, task_moe_lr: task-level MoE copies per layer, stage-1 steps
      and model learning rate (router: the official 1e-3).
    task_moe_stage2_steps: stage-2 steps (0: stage 2 skipped).
    dfwe_finetune_steps, dfwe_budget: DFWE per-expert few-shot fine-tuning steps, CMA-ES budget.
  """
  seed: int = 0
  corpus_lines: int = 4000
  vocab_pieces: int = 96
  vocab_size: int = 96
  emb_dim: int = 64
  num_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  input_length: int = 24
  target_length: int = 16
  pretrain_steps: int = 1000
  pretrain_batch: int = 32
  pretrain_lr: float = 2e-3
  train_examples: int = 2000
  expert_steps: int = 600
  expert_batch: int = 32
  expert_lr: float = 5e-3
  gate_steps: int = 100
  multitask_steps: int = 1800
  rank: int = 8
  top_k: int = 2
  eval_examples: int = 100
  context_examples: int = 50
  fewshot_examples: int = 5
  lorahub_budget: int = 40
  prototype_examples: int = 200
  eval_batch: int = 50
  poly_skills: int = 8
  poly_rank: int = 4
  mhr_heads: int = 8
  poly_steps: int = 1800
  poly_lr: float = 5e-3
  poly_z_lr: float = 0.1
  poly_adapt_steps: int = 100
  task_moe_experts: int = 3
  task_moe_steps: int = 1800
  task_moe_lr: float = 1e-3
  task_moe_stage2_steps: int = 0
  dfwe_finetune_steps: int = 50
  dfwe_budget: int = 100

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def quick_config(seed: int = 0) -> DemoConfig:
  """The reduced configuration of the test (`--quick`): same pipeline, 6 experts, tiny budgets."""
  return DemoConfig(seed=seed, corpus_lines=600, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                    num_encoder_layers=1, num_decoder_layers=1,
                    pretrain_steps=20, pretrain_batch=16, train_examples=100, expert_steps=8,
                    expert_batch=16, gate_steps=4, multitask_steps=8, eval_examples=12,
                    context_examples=6, fewshot_examples=3, lorahub_budget=4,
                    prototype_examples=16, eval_batch=12, poly_steps=8, poly_adapt_steps=3,
                    task_moe_steps=8, task_moe_stage2_steps=2, dfwe_finetune_steps=2,
                    dfwe_budget=4)


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------
class Progress:
  """One line per stage with the elapsed wall time; records stage durations."""

  def __init__(self, stream=None):
    self.stream = stream or sys.stdout
    self.start = time.time()
    self.timings: Dict[str, float] = {}
    self._stage: Optional[str] = None
    self._stage_start = self.start

  def stage(self, name: str) -> None:
    self._close()
    self._stage, self._stage_start = name, time.time()
    self.line(f"stage: {name}")

  def _close(self) -> None:
    if self._stage is not None:
      self.timings[self._stage] = round(time.time() - self._stage_start, 2)
      self._stage = None

  def line(self, text: str) -> None:
    print(f"[demo {time.time() - self.start:7.1f}s] {text}", file=self.stream, flush=True)

  def finish(self) -> Dict[str, float]:
    self._close()
    self.timings["total"] = round(time.time() - self.start, 2)
    return dict(self.timings)


def t5_config(cfg: DemoConfig):
  from phatgoose_jax.models.config import T5Config  # pylint: disable=g-import-not-at-top
  return T5Config(vocab_size=cfg.vocab_size, emb_dim=cfg.emb_dim, num_heads=cfg.num_heads,
                  num_encoder_layers=cfg.num_encoder_layers,
                  num_decoder_layers=cfg.num_decoder_layers, head_dim=cfg.head_dim,
                  mlp_dim=cfg.mlp_dim, dropout_rate=0.0, dtype="float32", param_dtype="float32")


def lengths(cfg: DemoConfig) -> Dict[str, int]:
  return {"inputs": cfg.input_length, "targets": cfg.target_length}


# ------------------------------------------------------------------------------------------------
# experts, gates, library, multitask
# ------------------------------------------------------------------------------------------------
class AdapterTrainer:
  """One compiled `training.Trainer` reused for every run of one adapter mode and step count."""

  def __init__(self, cfg: DemoConfig, config, params, fingerprint: str, mode: str, steps: int):
    import functools  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from phatgoose_jax import adapters as ad  # pylint: disable=g-import-not-at-top
    from phatgoose_jax import training  # pylint: disable=g-import-not-at-top
    self.cfg, self.params, self.fingerprint, self.mode, self.steps = (cfg, params, fingerprint,
                                                                     mode, steps)
    self.acfg = ad.AdapterConfig(mode=mode, rank=cfg.rank)
    self.model = ad.build_model(config, self.acfg)
    self.shapes = jax.eval_shape(functools.partial(ad.init_variables, self.model),
                                 jax.random.key(0))
    self._init = jax.jit(lambda r: ad.init_variables(self.model, r)["adapters"])
    init = jax.device_get(self._init(jax.random.key(0)))
    mask = ad.trainable_mask(init, "lora" if mode == "lora" else "gate")
    schedule = training.warmup_constant_schedule(cfg.expert_lr, steps)
    tx = training.adamw_optimizer(learning_rate=cfg.expert_lr, total_steps=steps)
    self.trainer = training.Trainer(self.model, mask, tx, training.create_mesh(1),
                                    training.logical_axis_rules(), learning_rate_fn=schedule)

  def run(self, model_dir: str, train_examples, valid_examples, sp, seed: int,
          lora: Optional[Mapping[str, Any]] = None, metadata: Optional[Mapping[str, Any]] = None,
          progress: bool = False):
    """Trains one adapter run and exports it to ``model_dir/export``; returns the FitResult."""
    import jax  # pylint: disable=g-import-not-at-top
    from phatgoose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from phatgoose_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
    cfg = self.cfg
    adapters = jax.device_get(self._init(jax.random.key(seed)))
    if lora is not None:  # gate training: the expert's LoRA, frozen.
      flat, src = state_lib.flatten(adapters), state_lib.flatten(lora)
      for key in flat:
        if key.rsplit("/", 1)[1] in ("lora_a", "lora_b"):
          flat[key] = np.asarray(src[key], np.float32)
      adapters = state_lib.unflatten(flat)
    variables = {"params": self.params, "params_axes": self.shapes["params_axes"],
                 "adapters": adapters, "adapters_axes": self.shapes["adapters_axes"]}
    state = self.trainer.create_state(variables, seed=seed)
    train_iter = pipeline.iterate_numpy_batches(train_examples, sp, lengths(cfg), cfg.expert_batch,
                                                shuffle=True, seed=seed, num_epochs=None,
                                                drop_remainder=True)
    eval_fn = lambda: pipeline.iterate_numpy_batches(valid_examples, sp, lengths(cfg),  # noqa: E731
                                                     cfg.eval_batch)
    meta = {"mode": self.mode, "rank": cfg.rank, "scale": 1.0 / cfg.rank,
            "site_pattern": self.acfg.site_pattern, "train_steps": self.steps,
            "batch_size": cfg.expert_batch, **dict(metadata or {})}
    # Gate runs validate only at their last step, as runs/train_gate.gin (the official
    # train_gate.sh), so the zero-initialised gate of step 0 can never be the export.
    return self.trainer.fit(state, train_iter, self.steps, model_dir=model_dir,
                            eval_iter_fn=eval_fn, eval_batch_size=cfg.eval_batch,
                            validate_at_start=self.mode != "gated_lora",
                            eval_every=self.steps, checkpoint_every=None,
                            log_every=max(self.steps // 4, 1), base_fingerprint=self.fingerprint,
                            export_metadata=meta, max_to_keep=1, async_checkpoints=False,
                            handle_signals=False, progress=progress)


def task_examples(cfg: DemoConfig, task: str, split: str, n: int) -> List[Dict[str, Any]]:
  from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.generate_examples(task, split, n, seed=cfg.seed)


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------
def _versions() -> Dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
         "optax": optax.__version__, "numpy": np.__version__, "platform": platform.platform(),
         "backend": jax.default_backend(), "cpu_count": str(os.cpu_count())}
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    out["phatgoose_jax"] = metadata.version("phatgoose_jax")
  except Exception:  # pylint: disable=broad-except  (not installed: running from a checkout)
    out["phatgoose_jax"] = "checkout"
  return out


def _prepare_output_dir(output_dir: str) -> str:
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise DemoError(f"--output_dir {output_dir} exists and is not a directory")
  os.makedirs(output_dir, exist_ok=True)
  for name in _OWNED:
    path = os.path.join(output_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
  return output_dir


def run_demo(output_dir: str = "demo_run", seed: int = 0, quick: bool = False,
             config: Optional[DemoConfig] = None, stream=None,
             trainer_progress: Optional[bool] = None) -> Dict[str, Any]:
  """Runs the whole demo; returns ``{'paths', 'results', 'table_markdown'}``.

  Args:
    output_dir: run folder (created; the demo's own sub-folders in it are replaced).
    seed: the seed (ignored when ``config`` is given).
    quick: the reduced test configuration (`quick_config`).
    config: an explicit `DemoConfig`.
    stream: where progress and the table are printed (default stdout).
    trainer_progress: tqdm bars of the trainer (default: off in quick mode).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from phatgoose_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from phatgoose_jax import demo_methods  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.library import ExpertLibrary, lora_from_adapters_tree  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top

  if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
    raise DemoError(f"--seed must be a non-negative int, got {seed!r}")
  cfg = config or (quick_config(seed) if quick else DemoConfig(seed=seed))
  show_bars = (not quick) if trainer_progress is None else trainer_progress
  out = _prepare_output_dir(output_dir)
  progress = Progress(stream)
  cpu0 = time.process_time()
  progress.line(f"run folder {out}; seed {cfg.seed}; {'quick' if quick else 'default'} "
                f"configuration; JAX backend {jax.default_backend()}")

  progress.stage("vocabulary")
  sp, corpus = build_vocabulary(cfg, os.path.join(out, "vocab"))
  progress.line(f"  {sp.GetPieceSize()} SentencePiece pieces from {len(corpus)} corpus lines")

  progress.stage("pretrain base model")
  config, params, pre_info = pretrain_base(cfg, sp, corpus, progress)
  fingerprint = checkpoints.save_checkpoint(os.path.join(out, "base"), params, config,
                                            step=cfg.pretrain_steps,
                                            extra_metadata={"demo": "synthetic pretraining"})
  experts = list(synthetic.SYNTHETIC_EXPERT_TASKS)
  train_data = {t: task_examples(cfg, t, "train", cfg.train_examples) for t in experts}
  valid_data = {t: task_examples(cfg, t, "validation", cfg.context_examples) for t in experts}

  progress.stage(f"train {len(experts)} LoRA experts")
  lora_runner = AdapterTrainer(cfg, config, params, fingerprint, "lora", cfg.expert_steps)
  expert_info = {}
  for i, task in enumerate(experts):
    res = lora_runner.run(os.path.join(out, "experts", task), train_data[task], valid_data[task],
                          sp, cfg.seed * 1000 + i, metadata={"task": task}, progress=show_bars)
    expert_info[task] = {"best": res.best, "train": res.last_train_metrics}
    progress.line(f"  expert {task}: validation loss {res.best['value']:.3f} "
                  f"(best step {res.best['step']})")

  progress.stage("train PHATGOOSE gates")
  gate_runner = AdapterTrainer(cfg, config, params, fingerprint, "gated_lora", cfg.gate_steps)
  library = ExpertLibrary.create(os.path.join(out, "library"), fingerprint, config)
  for i, task in enumerate(experts):
    expert_dir = os.path.join(out, "experts", task)
    lora_tree, _ = state_lib.load_exported_adapters(expert_dir)
    gate_dir = os.path.join(out, "gates", task)
    res = gate_runner.run(gate_dir, train_data[task], valid_data[task], sp,
                          cfg.seed * 1000 + 100 + i, lora=lora_tree,
                          metadata={"task": task, "expert_path": expert_dir}, progress=show_bars)
    tree, meta = state_lib.load_exported_adapters(gate_dir)
    lora, gates = lora_from_adapters_tree(tree)
    library.add(task, lora, meta["scale"], task=task, gates=gates, base_fingerprint=fingerprint,
                provenance={"training_run": expert_dir, "gate_run": gate_dir})
    expert_info[task]["gate_best"] = res.best
    progress.line(f"  gate {task}: validation loss {res.best['value']:.3f}")

  progress.stage("train multitask LoRA")
  union = [ex for t in experts for ex in train_data[t]]
  union_valid = [ex for t in experts for ex in valid_data[t]]
  mt_runner = (lora_runner if cfg.multitask_steps == cfg.expert_steps else  # same compiled step
               AdapterTrainer(cfg, config, params, fingerprint, "lora", cfg.multitask_steps))
  res = mt_runner.run(os.path.join(out, "multitask"), union, union_valid, sp,
                      cfg.seed * 1000 + 200, metadata={"task": "synthetic_multitask"},
                      progress=show_bars)
  progress.line(f"  multitask: validation loss {res.best['value']:.3f}")

  ctx = demo_methods.MethodContext(
      cfg=cfg, t5_config=config, params=params, vocab=sp, library=library, run_dir=out,
      experts=experts, train_data=train_data, progress=progress)
  evaluation = demo_methods.evaluate_all(ctx)

  progress.stage("report")
  timings = progress.finish()
  extra = {"config": cfg.to_dict(), "t5_config": config.to_dict(), "seed": cfg.seed,
           "quick": quick, "timings_s": timings,
           "cpu_time_s": round(time.process_time() - cpu0, 2), "versions": _versions(),
           "base_fingerprint": fingerprint, "pretraining": pre_info, "experts": expert_info,
           "vocabulary_pieces": sp.GetPieceSize()}
  report = demo_methods.write_outputs(ctx, evaluation, extra)
  print("\n" + report["table_markdown"], file=progress.stream, flush=True)
  for key in ("report", "results", "heatmap"):
    progress.line(f"wrote {report['paths'][key]}")
  progress.line(f"done in {timings['total']:.1f}s wall, {extra['cpu_time_s']:.1f}s CPU")
  return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The demo's flags (shared by ``phatgoose-jax demo`` and ``python -m phatgoose_jax.demo``)."""
  parser.add_argument("--output_dir", default="demo_run",
                      help="run folder (default: ./demo_run)")
  parser.add_argument("--seed", type=int, default=0, help="the one seed (default 0)")
  parser.add_argument("--quick", action="store_true",
                      help="reduced sizes (the test's configuration; numbers are meaningless)")
  parser.epilog = ("gin flags override DemoConfig fields: --gin_file=runs/demo.gin (the "
                   "defaults, documented) and --gin.DemoConfig.FIELD=VALUE, e.g. "
                   "--gin.DemoConfig.expert_steps=600")


def run_from_args(args: argparse.Namespace, gin_flags: Sequence[str] = ()) -> int:
  """Runs the demo from parsed flags; ``gin_flags`` (``--gin_file=...``, ``--gin.DemoConfig.x=...``)
  override `DemoConfig` fields (e.g. ``--gin_file=runs/demo.gin``)."""
  config = None
  if gin_flags:
    from phatgoose_jax import gin_utils  # pylint: disable=g-import-not-at-top
    files, bindings, paths, rest = gin_utils.split_flags(gin_flags)
    if rest:
      raise DemoError(f"demo: unrecognized arguments: {' '.join(rest)}")
    if not files:
      files = ["runs/demo.gin"]
    if args.quick:
      raise DemoError("demo: --quick cannot be combined with gin flags (bind DemoConfig fields)")
    gin_utils.parse_gin(files, bindings, paths)
    config = DemoConfig(seed=args.seed)  # gin bindings fill the other fields.
  run_demo(args.output_dir, seed=args.seed, quick=args.quick, config=config)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  from phatgoose_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.main(["demo"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  sys.exit(main())
