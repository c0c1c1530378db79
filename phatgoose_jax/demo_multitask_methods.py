"""The demo's baselines that train on the union of the expert tasks or on a few target examples:
Polytropon / MHR, task-level MoE and DFWE (runners for `demo_methods.METHOD_RUNNERS`).

Protocols (every setting is a `demo.DemoConfig` field fixed before any evaluation):

* Poly (Ponti et al. 2023) and MHR (Caccia et al. 2023; `methods.polytropon`): one inventory of
  ``poly_skills`` LoRA skills of rank ``poly_rank`` at every site and a routing matrix Z
  [6, H, K] (H = 1 for Poly, ``mhr_heads`` for MHR), trained jointly (base frozen) on the union of
  the 6 expert tasks' training data with task id = the expert task's index (Gumbel-sigmoid
  routing, mttl's separate learning rate ``poly_z_lr`` for Z), ``poly_steps`` steps of batch
  ``expert_batch``. A held-out task has no Z row, so three rows per model:
    - "Poly (mean Z)" / "MHR (mean Z)": zero-shot; the unseen task gets the mean of the 6
      trained Z rows (`add_task_rows(init='mean')`, routed with sigmoid + normalisation as any task).
    - "Poly-mu" / "MHR-mu": zero-shot; every skill weighted 1/K (Caccia et al.'s mu: the skills
      averaged into one LoRA, `merge_skills`; exactly uniform routing).
    - "Poly-z (k-shot)" / "MHR-z (k-shot)": a new Z row (zero logits = uniform start) trained
      alone (skills frozen, `adapt_to_new_task(train='z')`, ``poly_adapt_steps`` steps) on the same
      k = ``fewshot_examples`` labelled held-out training examples LoraHub gets.
  On the expert tasks (context table) every Poly/MHR row routes with the task's own trained row,
  except -mu (uniform) and -z (held-out only).
* Task-level MoE (Ye et al. 2022; `methods.task_moe`): ``task_moe_experts`` copies of every layer
  (initialised from the base), a router MLP per layer on a TEXT task representation (mean over
  the task's inputs of the frozen base encoder's mean-pooled output, ``task_repr='input'``), so an
  unseen task can be routed: stage 1 trains base + copies + router jointly on the union
  (``task_moe_steps`` steps, straight-through Gumbel-softmax, lr ``task_moe_lr`` for the model,
  the official 1e-3 for the router). Stage 2 (the official one: every weight back to the base
  model, router frozen, routes softmax(logits / tau) annealed from tau 300 to 1, warm-up and
  linear decay) runs only if ``task_moe_stage2_steps`` > 0 (0 in the default demo, to keep its
  runtime). A held-out task's representation comes from ``prototype_examples`` UNLABELLED inputs
  of its training split (no targets; marked "(unlabelled inputs)"); its route is the router's
  argmax after stage 1 and softmax(logits) after stage 2. Evaluation uses the exact equivalent
  plain T5 (each site's kernel = its routed mix of copies).
* DFWE (Ninalga 2023; `methods.dfwe`): each library expert fine-tuned on the k labelled examples
  (``dfwe_finetune_steps`` Adam steps), then CMA-ES (``dfwe_budget`` loss evaluations) over simplex
  weights interpolating the fine-tuned experts' updates, scored by the k-shot loss.

Letters: N examples, B batch, D site input, F site output, R LoRA rank, K skills, H heads.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from phatgoose_jax.demo_methods import Method, MethodContext, lora_model, lora_variables


# ------------------------------------------------------------------------------------------------
# shared data
# ------------------------------------------------------------------------------------------------
def union_batches(ctx: MethodContext) -> Dict[str, np.ndarray]:
  """The union of the expert tasks' training data, encoded once, with ``task_ids`` [N]."""
  if "union_encoded" not in ctx.cache:
    from phatgoose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from phatgoose_jax.demo import lengths  # pylint: disable=g-import-not-at-top
    examples, ids = [], []
    for i, task in enumerate(ctx.experts):
      examples += ctx.train_data[task]
      ids += [i] * len(ctx.train_data[task])
    enc = pipeline.encode_examples(examples, ctx.vocab, lengths(ctx.cfg))
    enc["task_ids"] = np.asarray(ids, np.int32)
    ctx.cache["union_encoded"] = enc
  return ctx.cache["union_encoded"]


def sample_batches(data: Mapping[str, np.ndarray], batch: int, steps: int, seed: int):
  """``steps`` random batches (uniform over the union, without replacement within an epoch)."""
  rng = np.random.default_rng(seed)
  n = len(data["task_ids"])
  order = np.empty((0,), np.int64)
  for _ in range(steps):
    if len(order) < batch:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:batch], order[batch:]
    yield {k: v[idx] for k, v in data.items()}


def fewshot_batch(ctx: MethodContext, task: str) -> Dict[str, np.ndarray]:
  """The k labelled training examples of a held-out task (the ones LoraHub gets)."""
  from phatgoose_jax.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.demo import lengths  # pylint: disable=g-import-not-at-top
  shots = synthetic.generate_examples(task, "train", ctx.cfg.fewshot_examples, seed=ctx.cfg.seed)
  return pipeline.encode_examples(shots, ctx.vocab, lengths(ctx.cfg))


def _heldout_tasks() -> List[str]:
  from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return list(synthetic.SYNTHETIC_HELDOUT_TASKS)


def _record(ctx: MethodContext, name: str, info: Mapping[str, Any]) -> None:
  ctx.cache.setdefault("training_info", {})[name] = dict(info)


# ------------------------------------------------------------------------------------------------
# Polytropon / MHR
# ------------------------------------------------------------------------------------------------
def train_poly(ctx: MethodContext, heads: int, label: str):
  """Multitask Poly (heads = 1) or MHR training on the union; returns (model, variables)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import polytropon as poly  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.models import Transformer, cross_entropy_loss  # pylint: disable=g-import-not-at-top
  cfg = ctx.cfg
  pcfg = poly.PolytroponConfig(num_tasks=len(ctx.experts), num_skills=cfg.poly_skills,
                               num_heads=heads, rank=cfg.poly_rank)
  model = Transformer(ctx.t5_config, poly.make_poly_site_factory(pcfg))
  init = model.init({"params": jax.random.key(cfg.seed + 300 + heads)}, np.ones((1, 4), np.int32),
                    np.ones((1, 3), np.int32), np.ones((1, 3), np.int32), enable_dropout=False,
                    site_inputs={"task_ids": np.zeros((1,), np.int32)})
  adapters = jax.device_get(init["adapters"])
  params = ctx.params
  tx = poly.poly_optimizer(cfg.poly_lr, cfg.poly_z_lr)
  opt_state = tx.init(adapters)

  def loss_fn(a, batch, rng, training):
    logits = model.apply({"params": params, "adapters": a}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                         enable_dropout=False, rngs={"routing": rng},
                         site_inputs={"task_ids": batch["task_ids"], "training": training})
    return cross_entropy_loss(logits, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"])[0]

  @jax.jit
  def step(a, o, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(a, batch, rng, True)
    updates, o = tx.update(grads, o, a)
    return optax.apply_updates(a, updates), o, loss

  eval_loss = jax.jit(lambda a, batch: loss_fn(a, batch, jax.random.key(0), False))
  window = max(cfg.poly_steps // 4, 1)
  last = None
  batches = sample_batches(union_batches(ctx), cfg.expert_batch, cfg.poly_steps,
                           cfg.seed * 1000 + 300 + heads)
  for i, batch in enumerate(batches):
    adapters, opt_state, loss = step(adapters, opt_state, batch,
                                     jax.random.fold_in(jax.random.key(cfg.seed), i))
    if (i + 1) % window == 0 or i + 1 == cfg.poly_steps:
      last = float(loss)
      ctx.progress.line(f"  {label} step {i + 1}/{cfg.poly_steps} loss {last:.3f}")
  valid = _valid_batch(ctx)
  vloss = float(eval_loss(adapters, {k: jnp.asarray(v) for k, v in valid.items()}))
  ctx.progress.line(f"  {label}: validation loss {vloss:.3f} (own task rows)")
  _record(ctx, label, {"steps": cfg.poly_steps, "final_train_loss": last,
                       "validation_loss": vloss, "skills": cfg.poly_skills, "heads": heads,
                       "rank": cfg.poly_rank})
  return model, {"params": params, "adapters": jax.device_get(adapters)}


def _valid_batch(ctx: MethodContext) -> Dict[str, np.ndarray]:
  """The expert tasks' validation examples (context split) with their task ids."""
  from phatgoose_jax.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.demo import lengths  # pylint: disable=g-import-not-at-top
  examples, ids = [], []
  for i, task in enumerate(ctx.experts):
    exs = synthetic.generate_examples(task, "validation", ctx.cfg.context_examples,
                                      seed=ctx.cfg.seed)
    examples += exs
    ids += [i] * len(exs)
  enc = pipeline.encode_examples(examples, ctx.vocab, lengths(ctx.cfg))
  enc["task_ids"] = np.asarray(ids, np.int32)
  return enc


def _padded_lora(ctx: MethodContext, lora: Mapping[str, Mapping[str, Any]], rank: int) -> dict:
  """A rank-``rank`` LoRA (scale 1/rank) as variables of the shared rank-R model (zero-padded)."""
  pad = ctx.cfg.rank - rank
  out = {}
  for site, ab in lora.items():
    a, b = np.asarray(ab["lora_a"], np.float32), np.asarray(ab["lora_b"], np.float32)
    out[site] = {"lora_a": np.pad(a, ((0, 0), (0, pad))), "lora_b": np.pad(b, ((0, pad), (0, 0)))}
  return lora_variables(ctx, out, 1.0 / rank)


def _poly_rows(ctx: MethodContext, heads: int, name: str) -> List[Method]:
  from phatgoose_jax.library import lora_from_adapters_tree  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import polytropon as poly  # pylint: disable=g-import-not-at-top
  cfg = ctx.cfg
  if cfg.poly_rank > cfg.rank:
    from phatgoose_jax.demo import DemoError  # pylint: disable=g-import-not-at-top
    raise DemoError(f"DemoConfig.poly_rank={cfg.poly_rank} must be <= rank={cfg.rank}")
  model, variables = train_poly(ctx, heads, name)
  heldout = _heldout_tasks()
  new_id = len(ctx.experts)
  mean_vars = {"params": ctx.params,
               "adapters": poly.add_task_rows(variables["adapters"], 1, "mean")}

  def task_ids(task_id_of):
    return lambda task, exs: {"task_ids": np.full((len(exs),), task_id_of(task), np.int32)}

  own_or_new = lambda task: new_id if task in heldout else ctx.experts.index(task)  # noqa: E731
  merged, _ = lora_from_adapters_tree(poly.merge_skills(variables["adapters"]))
  k = cfg.fewshot_examples
  adapted = adapt_z_rows(ctx, model, variables, name)
  what = ("Poly" if heads == 1 else f"MHR ({heads} heads)") + (
      f", {cfg.poly_skills} skills of rank {cfg.poly_rank} trained on the union with task ids")
  return [
      Method(f"{name} (mean Z)", model, lambda _t: mean_vars, task_ids(own_or_new),
             note=f"{what}; held-out tasks routed zero-shot by the mean of the trained Z rows "
                  "(expert tasks: their own row)"),
      Method(f"{name}-mu", lora_model(ctx), lambda _t: _padded_lora(ctx, merged, cfg.poly_rank),
             note=f"{what}; every skill weighted 1/K (skills averaged into one LoRA), zero-shot"),
      Method(f"{name}-z ({k}-shot)", model, lambda task: adapted[task],
             task_ids(lambda _t: new_id), heldout_only=True,
             note=f"{what}; a new Z row (uniform start) trained alone for {cfg.poly_adapt_steps} "
                  f"steps on {k} labelled examples per held-out task"),
  ]


def adapt_z_rows(ctx: MethodContext, model: Any, variables: Mapping[str, Any],
                 label: str) -> Dict[str, dict]:
  """MHR-z / Poly-z per held-out task: `polytropon.adapt_to_new_task` with ``train='z'`` and
  ``new_row_init='uniform'`` (a new Z row with zero logits trained alone on the k labelled
  examples, skills frozen); its compiled step is shared by the held-out tasks."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import polytropon as poly  # pylint: disable=g-import-not-at-top
  cfg = ctx.cfg
  adapt = poly.PolyAdaptConfig(train="z", new_row_init="uniform", steps=cfg.poly_adapt_steps,
                               learning_rate=cfg.poly_lr, z_learning_rate=cfg.poly_z_lr)
  out = {}
  for t_i, task in enumerate(_heldout_tasks()):
    batch = {key: jnp.asarray(v) for key, v in fewshot_batch(ctx, task).items()}
    adapted, new_id, losses = poly.adapt_to_new_task(
        model, variables, [batch], jax.random.key(cfg.seed + 500 + t_i), adapt)
    if new_id != len(ctx.experts):
      raise ValueError(f"{label}-z: the new task row is {new_id}, expected {len(ctx.experts)}")
    out[task] = {"params": variables["params"], "adapters": jax.device_get(adapted["adapters"])}
    if losses:
      ctx.progress.line(f"  {label}-z {task}: {cfg.fewshot_examples}-shot loss {losses[0]:.3f} "
                        f"-> {losses[-1]:.3f}")
  return out


def run_poly(ctx: MethodContext) -> List[Method]:
  return _poly_rows(ctx, 1, "Poly")


def run_mhr(ctx: MethodContext) -> List[Method]:
  return _poly_rows(ctx, ctx.cfg.mhr_heads, "MHR")


# ------------------------------------------------------------------------------------------------
# task-level MoE
# ------------------------------------------------------------------------------------------------
def task_representations(ctx: MethodContext, texts: Mapping[str, Sequence[str]]) -> Dict[str, Any]:
  """{task: [D]}: mean over the task's inputs of the frozen base encoder's mean-pooled output."""
  from phatgoose_jax import adapters as ad  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.evaluation import generation  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import task_moe  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  plain = ctx.cache.setdefault("plain_model", ad.build_model(ctx.t5_config))
  encode = ctx.cache.setdefault("pooled_fn", jax.jit(
      lambda tokens: task_moe.mean_pooled_encoding(plain, {"params": ctx.params}, tokens)))
  out = {}
  for task, inputs in texts.items():
    ids = generation.encode_texts(ctx.vocab, list(inputs), ctx.cfg.input_length)
    tokens = generation.pad_batch(ids, ctx.cfg.input_length)  # [N, L]
    out[task] = np.asarray(encode(tokens)).mean(axis=0)  # [D]
  return out


def _routed_params(params: Mapping[str, Any], adapters: Mapping[str, Any],
                   routes: Mapping[str, np.ndarray]) -> dict:
  """Plain-T5 params equal to the task-MoE model under ``routes`` {stack: [n, m]} (one-hot or
  soft): each site's ``kernel`` <- its routed ``experts_kernel`` mix."""
  def walk(p, a, path):
    out = dict(p)
    for key, value in a.items():
      if key == "experts_kernel":
        stack, layer = path[0], int(path[1].split("_")[1])
        w = np.asarray(routes[stack][layer], np.float32)  # [m]
        out["kernel"] = np.einsum("e,edf->df", w, np.asarray(value, np.float32))
      else:
        out[key] = walk(p[key], value, path + (key,))
    return out
  return walk(params, adapters, ())


def run_task_moe(ctx: MethodContext) -> List[Method]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import task_moe  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.models import Transformer, cross_entropy_loss  # pylint: disable=g-import-not-at-top
  cfg, t5 = ctx.cfg, ctx.t5_config
  mcfg = task_moe.TaskMoEConfig(num_experts=cfg.task_moe_experts, num_tasks=len(ctx.experts),
                                task_repr="input", task_dim=t5.emb_dim,
                                learning_rate=cfg.task_moe_lr)
  n = cfg.prototype_examples
  train_texts = {t: [ex["inputs"] for ex in ctx.train_data[t][:n]] for t in ctx.experts}
  heldout_texts = {t: [ex["inputs"] for ex in synthetic.generate_examples(t, "train", n,
                                                                           seed=cfg.seed)]
                   for t in _heldout_tasks()}  # unlabelled: targets never read
  reprs = task_representations(ctx, {**train_texts, **heldout_texts})
  table = np.stack([reprs[t] for t in ctx.experts])  # [6, D]
  model = Transformer(t5, task_moe.make_task_moe_site_factory(mcfg))
  router = task_moe.TaskMoERouter(mcfg, t5.num_encoder_layers, t5.num_decoder_layers)
  key = jax.random.key(cfg.seed + 700)
  routes0 = {"encoder": np.ones((1, t5.num_encoder_layers, mcfg.num_experts), np.float32),
             "decoder": np.ones((1, t5.num_decoder_layers, mcfg.num_experts), np.float32)}
  init = model.init({"params": key}, np.ones((1, 4), np.int32), np.ones((1, 3), np.int32),
                    np.ones((1, 3), np.int32), enable_dropout=False,
                    site_inputs={"layer_routes": routes0})
  adapters = jax.device_get(init["adapters"])
  adapters = task_moe.reinit_experts(ctx.params, adapters)  # copies of the PRETRAINED layers
  router_params = router.init(jax.random.key(cfg.seed + 701), None, table[:1])["params"]
  trainable = {"params": ctx.params, "adapters": adapters, "router": router_params}
  tx = task_moe.task_moe_optimizer(mcfg)
  opt_state = tx.init(trainable)
  step_fn = task_moe.make_train_step(model, router, tx, mcfg, stage=1)
  table_j = jnp.asarray(table)
  window = max(cfg.task_moe_steps // 4, 1)
  last = None
  batches = sample_batches(union_batches(ctx), cfg.expert_batch, cfg.task_moe_steps,
                           cfg.seed * 1000 + 700)
  for i, batch in enumerate(batches):
    batch = dict(batch, task_repr=table_j[batch["task_ids"]])
    trainable, opt_state, loss = step_fn(trainable, opt_state, None, batch, i,
                                         jax.random.fold_in(key, i))
    if (i + 1) % window == 0 or i + 1 == cfg.task_moe_steps:
      last = float(loss)
      ctx.progress.line(f"  task MoE stage 1 step {i + 1}/{cfg.task_moe_steps} loss {last:.3f}")
  trainable = jax.device_get(trainable)
  router_vars = {"params": trainable["router"]}
  stage2_ran = cfg.task_moe_stage2_steps > 0
  if stage2_ran:
    # Official stage 2: router frozen, every parameter back to the pre-trained model, annealed
    # soft routes (`task_moe.stage2_step_routes`).
    frozen = task_moe.stage2_frozen(router, router_vars, mcfg, None, table_j)  # {stack: [6, n, m]}
    stage2 = {"params": ctx.params,
              "adapters": task_moe.reinit_experts(ctx.params, trainable["adapters"])}
    tx2 = task_moe.task_moe_optimizer(mcfg, total_steps=cfg.task_moe_stage2_steps)
    opt2 = tx2.init(stage2)
    step2 = task_moe.make_train_step(model, router, tx2, mcfg, stage=2)
    for i, batch in enumerate(sample_batches(union_batches(ctx), cfg.expert_batch,
                                             cfg.task_moe_stage2_steps, cfg.seed * 1000 + 701)):
      stage2, opt2, loss = step2(stage2, opt2, frozen, batch, i, jax.random.fold_in(key, 10**6 + i))
    ctx.progress.line(f"  task MoE stage 2: {cfg.task_moe_stage2_steps} steps, loss "
                      f"{float(loss):.3f}")
    trainable = dict(jax.device_get(stage2), router=trainable["router"])
  valid = _valid_batch(ctx)
  def eval_routes(logits):  # one-hot after stage 1; stage 2's softmax(logits / 1) after it
    return (task_moe.stage2_eval_routes(logits, mcfg) if stage2_ran
            else task_moe.routes_from_logits(logits, "argmax"))
  v_routes = eval_routes(router.apply(router_vars, None, table[valid["task_ids"]]))
  v_loss_fn = jax.jit(lambda variables, batch, routes: cross_entropy_loss(
      model.apply(variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                  batch["decoder_target_tokens"], enable_dropout=False,
                  site_inputs={"layer_routes": routes}),
      batch["decoder_target_tokens"], batch["decoder_loss_weights"])[0])
  vloss = float(v_loss_fn({"params": trainable["params"], "adapters": trainable["adapters"]},
                          {k: v for k, v in valid.items() if k != "task_ids"}, v_routes))
  ctx.progress.line(f"  task MoE: validation loss {vloss:.3f} "
                    f"({'stage-2 softmax' if stage2_ran else 'argmax'} routes)")
  tasks = list(ctx.experts) + _heldout_tasks()
  logits = router.apply(router_vars, None, jnp.asarray(np.stack([reprs[t] for t in tasks])))
  routes = eval_routes(logits)
  per_task, chosen = {}, {}
  zero = _zero_lora(ctx)
  for i, task in enumerate(tasks):
    r = {s: np.asarray(v[i]) for s, v in routes.items()}  # {stack: [n, m]}
    chosen[task] = {s: [int(j) for j in np.argmax(v, -1)] for s, v in r.items()}
    per_task[task] = {"params": _routed_params(trainable["params"], trainable["adapters"], r),
                      "adapters": zero}
  ctx.progress.line(f"  task MoE routes (copy per layer): {chosen}")
  _record(ctx, "Task-level MoE", {"steps": cfg.task_moe_steps,
                                  "stage2_steps": cfg.task_moe_stage2_steps,
                                  "final_train_loss": last, "validation_loss": vloss,
                                  "routes": chosen})
  stages = ("stage 1 only" if cfg.task_moe_stage2_steps == 0 else
            f"stage 2 {cfg.task_moe_stage2_steps} steps")
  return [Method("Task-level MoE (unlabelled inputs)", lora_model(ctx),
                 lambda task: per_task[task],
                 note=f"ALL weights trained (base + {mcfg.num_experts} copies per layer, not a "
                      "LoRA) with a per-layer router on the mean "
                      f"base-encoder representation of a task's inputs, {cfg.task_moe_steps} "
                      f"joint steps ({stages}); held-out tasks routed from {n} unlabelled "
                      "inputs of their train split")]


def _zero_lora(ctx: MethodContext) -> dict:
  """Adapters of the shared LoRA model that add exactly zero (lora_b = 0)."""
  expert = ctx.library.load(ctx.experts[0])
  zero = {s: {"lora_a": ab["lora_a"], "lora_b": np.zeros_like(ab["lora_b"])}
          for s, ab in expert.lora.items()}
  return lora_variables(ctx, zero)["adapters"]


# ------------------------------------------------------------------------------------------------
# DFWE
# ------------------------------------------------------------------------------------------------
def run_dfwe(ctx: MethodContext) -> List[Method]:
  from phatgoose_jax import adapters as ad  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.demo_methods import stacked  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.methods import dfwe  # pylint: disable=g-import-not-at-top
  cfg = ctx.cfg
  st = stacked(ctx, None)
  k = cfg.fewshot_examples
  per_task, weights, model = {}, {}, None
  for task in _heldout_tasks():
    res = dfwe.dfwe(ctx.t5_config, ctx.params, st, fewshot_batch(ctx, task),
                    dfwe.DFWEConfig(finetune_steps=cfg.dfwe_finetune_steps,
                                    budget=cfg.dfwe_budget, seed=1 + cfg.seed))
    if model is None:  # one model (rank E*R, scale 1) for every task
      model = ad.build_model(ctx.t5_config, ad.AdapterConfig(mode="lora", rank=res.rank,
                                                             scale=1.0))
    per_task[task] = {"params": ctx.params, "adapters": res.adapters}
    weights[task] = [round(float(w), 4) for w in res.weights]
    ctx.progress.line(f"  DFWE {task}: {k}-shot loss {res.history[0][2]:.3f} (uniform) -> "
                      f"{res.loss:.3f}; weights {weights[task]}")
  _record(ctx, "DFWE", {"weights": weights, "finetune_steps": cfg.dfwe_finetune_steps,
                        "budget": cfg.dfwe_budget})
  return [Method(f"DFWE ({k}-shot)", model, lambda task: per_task[task], heldout_only=True,
                 note=f"each expert fine-tuned {cfg.dfwe_finetune_steps} steps on {k} labelled "
                      f"examples, then CMA-ES ({cfg.dfwe_budget} evaluations) over simplex "
                      "weights interpolating their updates, on the few-shot loss")]
