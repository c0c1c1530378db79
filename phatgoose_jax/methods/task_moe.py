"""Task-level mixture-of-experts (Ye et al. 2022, "Eliciting and understanding cross-task skills
with task-level mixture-of-experts", Findings of EMNLP).

Every transformer layer has m copies ("experts"); a router maps a task representation to one expert
per layer, the same for every token of every example of that task. Conventions follow the official
code (INK-USC/CrossTaskMoE: ``modules/router_v2.py`` ``LinearLayerSpecificRouter``,
``utils.get_gumbel_temperature``, ``cli_heterogenous.py`` defaults, ``example_scripts/compute_arg.py``):

* m = 3 experts per layer (``router_block_num``), each initialised from the pre-trained layer.
  Here a layer's expert is the set of its sites' ``experts_kernel`` [m, D, F] (``adapters``
  collection, copies of the base ``kernel``), so the ``params`` tree is the plain T5's.
* router: one 2-layer MLP per layer (``linear_layer_specific``), ``Dense(d_task -> 64)``, GELU,
  ``Dense(64 -> m)`` (the code uses GELU; ``router_activation='relu'`` is available), on a task
  representation [B, d_task]: a learned task embedding per task id (``task_repr='embedding'``) or
  one given by the caller (``'input'``, e.g. `mean_pooled_encoding` of the task's text).
* training: straight-through Gumbel-softmax (``gumbel_softmax_st``: forward one-hot, gradient of the
  soft sample); temperature tau(step) = max(tau0 exp(-r step), tau_min) with tau0 = 2.0,
  tau_min = 0.1, r = 3e-4 (code defaults). Evaluation: argmax of the router logits (no noise; the
  official code keeps sampling at tau_min).
* a site mixes its experts' kernels with the layer's route weights w [B, m]:
  ``y = u @ (sum_e w_e W_e)``; with one-hot w this is exactly the chosen layer copy. (The official
  code weights whole-layer outputs, which gives the same forward pass with one-hot routes and a
  slightly different router gradient.)
* two stages: (1) train router + experts jointly; (2) as the official stage-2 script
  (``run_merged_fisher128freeze_1e-5.sh``: ``--router_lr 0 --task_model_lr 0 --router_mode
  softmax --initial_tau 300 --minimum_tau 1 --anneal_rate 1e-4``, model rebuilt from pre-trained
  BART by ``build_a_checkpoint2.py``): freeze the router and the task representations
  (`stage2_frozen`: each task's router logits), start every parameter again from the pre-trained
  model (`reinit_experts` on the pre-trained ``params``) and train the model with soft routes
  ``softmax(logits / tau2(step))``, tau2 annealed from 300 (nearly uniform) to 1
  (``stage2_*`` fields); evaluation after stage 2 uses ``softmax(logits / 1)``
  (`stage2_eval_routes`, as the official predict at ``minimum_tau``).
  ``stage2_routes='argmax'`` instead trains and evaluates with the frozen one-hot argmax routes
  (the paper's description of fixed routes; not what the code ran).
* deviations (kept because the project's T5 keeps t5x's parameter tree): experts are per-site
  kernels, so layer norms and the relative-position bias are shared by a layer's copies (the
  official experts are whole BART layers with their own layer norms), and a soft route mixes the
  copies' kernels, a weight-space mixture, where the official code mixes the copies' layer
  outputs (identical for one-hot routes, i.e. stage 1 and argmax evaluation); no gradient
  accumulation (the official default accumulates 2 batches).
* ARG (average relative gain) = mean over tasks of (s - b) / b, a fraction (the paper prints it x100
  as a percentage): `average_relative_gain`.

Routes reach the sites as ``site_inputs['layer_routes'] = {'encoder': [B, n_enc, m],
'decoder': [B, n_dec, m]}``.

Letters: B batch, L tokens, D site input, F site output, E (= m) experts, T tasks.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from phatgoose_jax.models import layers
from phatgoose_jax.models.scoring import cross_entropy_loss

Array = jax.Array
ADAPTERS = "adapters"
ALL_SITES = r"(encoder|decoder)/layers_\d+/.*"
_LAYER_RE = re.compile(r"(encoder|decoder)/layers_(\d+)/.*")
_ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu}


class TaskMoEError(ValueError):
  """A task-level MoE setting or input is invalid (the message names the field or key)."""


@gin.configurable(module="phatgoose_jax.methods")
@dataclasses.dataclass(frozen=True)
class TaskMoEConfig:
  """Task-level MoE hyper-parameters (defaults: the official code).

  Attributes:
    num_experts: m, copies per layer (3).
    num_tasks: rows of the learned task embedding (``task_repr='embedding'``).
    task_repr: 'embedding' (learned per task id) or 'input' (caller gives [B, task_dim]).
    task_dim: width of the task representation (768 in the code).
    router_hidden_dim: hidden width of each layer's router MLP (64).
    router_activation: 'gelu' (code) or 'relu'.
    initial_tau, minimum_tau, anneal_rate: `temperature_schedule` (2.0, 0.1, 3e-4).
    learning_rate, router_learning_rate, task_embedding_learning_rate: AdamW lrs of the model, the
      router MLPs and the task embeddings (1e-5, 1e-3, 1e-2 in ``train_routing_bart.sh``).
    weight_decay, clip_norm: AdamW decay (0.01) and global-norm clipping (0.1).
    warmup_ratio: linear warm-up fraction of ``total_steps`` in `task_moe_optimizer` (0.06; the
      rate then decays linearly to 0, HF ``get_linear_schedule_with_warmup`` as the code).
    stage2_routes: 'softmax' (the official stage 2, annealed soft routes) or 'argmax'.
    stage2_initial_tau, stage2_minimum_tau, stage2_anneal_rate: stage-2 softmax temperature
      ``max(300 exp(-1e-4 step), 1)`` (the official stage-2 script).
    site_pattern: regex (fullmatch) over site names that get experts.
  """
  num_experts: int = 3
  num_tasks: int = 1
  task_repr: str = "embedding"
  task_dim: int = 768
  router_hidden_dim: int = 64
  router_activation: str = "gelu"
  initial_tau: float = 2.0
  minimum_tau: float = 0.1
  anneal_rate: float = 3e-4
  learning_rate: float = 1e-5
  router_learning_rate: float = 1e-3
  task_embedding_learning_rate: float = 1e-2
  weight_decay: float = 0.01
  clip_norm: Optional[float] = 0.1
  warmup_ratio: float = 0.06
  stage2_routes: str = "softmax"
  stage2_initial_tau: float = 300.0
  stage2_minimum_tau: float = 1.0
  stage2_anneal_rate: float = 1e-4
  site_pattern: str = ALL_SITES

  def __post_init__(self):
    for field in ("num_experts", "num_tasks", "task_dim", "router_hidden_dim"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskMoEError(f"TaskMoEConfig.{field} must be a positive int, got {value!r}")
    if self.task_repr not in ("embedding", "input"):
      raise TaskMoEError(f"TaskMoEConfig.task_repr must be 'embedding' or 'input', "
                         f"got {self.task_repr!r}")
    if self.router_activation not in _ACTIVATIONS:
      raise TaskMoEError(f"TaskMoEConfig.router_activation must be one of {sorted(_ACTIVATIONS)}, "
                         f"got {self.router_activation!r}")
    for prefix in ("", "stage2_"):
      lo, hi, rate = (getattr(self, prefix + f) for f in ("minimum_tau", "initial_tau",
                                                          "anneal_rate"))
      if not 0 < lo <= hi or rate < 0:
        raise TaskMoEError(f"TaskMoEConfig: need 0 < {prefix}minimum_tau <= {prefix}initial_tau "
                           f"and {prefix}anneal_rate >= 0, got {lo!r}, {hi!r}, {rate!r}")
    if self.stage2_routes not in ("softmax", "argmax"):
      raise TaskMoEError(f"TaskMoEConfig.stage2_routes must be 'softmax' or 'argmax', got "
                         f"{self.stage2_routes!r}")
    if not 0 <= self.warmup_ratio < 1:
      raise TaskMoEError(f"TaskMoEConfig.warmup_ratio must be in [0, 1), got "
                         f"{self.warmup_ratio!r}")


def temperature_schedule(step: Union[int, Array], initial_tau: float = 2.0,
                         minimum_tau: float = 0.1, anneal_rate: float = 3e-4) -> Array:
  """Gumbel temperature after ``step`` updates: max(initial_tau * exp(-anneal_rate * step), min)."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.maximum(initial_tau * jnp.exp(-anneal_rate * step), minimum_tau)


def gumbel_softmax_st(rng: Array, logits: Array, tau: Union[float, Array]) -> Array:
  """Straight-through Gumbel-softmax over the last axis, in float32.

  Forward: the exact one-hot of argmax((logits + g) / tau); backward: gradient of the soft sample
  softmax((logits + g) / tau) (torch ``gumbel_softmax(hard=True)``).
  """
  logits = jnp.asarray(logits, jnp.float32)
  g = jax.random.gumbel(rng, logits.shape, jnp.float32)
  soft = jax.nn.softmax((logits + g) / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return hard + (soft - jax.lax.stop_gradient(soft))  # forward value: exactly `hard`


def routes_from_logits(logits: Mapping[str, Array], mode: str = "argmax",
                       tau: Union[float, Array] = 1.0, rng: Optional[Array] = None) -> dict:
  """Router logits {stack: [B, n, m]} -> route weights of the same shapes.

  Args:
    mode: 'gumbel_st' (training), 'argmax' (evaluation, one-hot) or 'softmax' (analysis).
  """
  if mode == "gumbel_st":
    if rng is None:
      raise TaskMoEError("routes_from_logits: mode='gumbel_st' needs an rng")
    return {k: gumbel_softmax_st(jax.random.fold_in(rng, i), v, tau)
            for i, (k, v) in enumerate(sorted(logits.items()))}
  if mode == "argmax":
    return {k: jax.nn.one_hot(jnp.argmax(v, -1), v.shape[-1], dtype=jnp.float32)
            for k, v in logits.items()}
  if mode == "softmax":
    return {k: jax.nn.softmax(jnp.asarray(v, jnp.float32) / tau, -1) for k, v in logits.items()}
  raise TaskMoEError(f"routes_from_logits.mode must be 'gumbel_st', 'argmax' or 'softmax', "
                     f"got {mode!r}")


class TaskMoESite(layers.DenseSite):
  """m expert copies of a site's kernel, mixed by the layer's route weights.

  Declares the base ``kernel`` (unused in the forward pass, kept so the params tree is T5's) and
  ``experts_kernel`` [m, D, F] in ``adapters`` (initialised as copies of ``kernel``). Reads
  ``site_inputs['layer_routes'][stack]`` [B, n_layers, m].
  """
  num_experts: int = 3

  @nn.compact
  def __call__(self, x: Array, **site_inputs) -> Array:
    """x [B, ..., D] -> [B, ..., F]."""
    match = _LAYER_RE.fullmatch(self.site)
    if match is None:
      raise TaskMoEError(f"TaskMoESite: site {self.site!r} is not in an encoder/decoder layer")
    stack, index = match.group(1), int(match.group(2))
    kernel = layers.param_with_axes("kernel", self.kernel_init, (x.shape[-1], self.features),
                                    self.param_dtype, axes=self.kernel_axes)
    m = self.num_experts
    experts = nn_partitioning.variable_with_axes(
        ADAPTERS, "experts_kernel", lambda: jnp.broadcast_to(kernel, (m,) + kernel.shape),
        axes=("expert",) + tuple(self.kernel_axes)).value
    routes = site_inputs.get("layer_routes")
    if routes is None or stack not in routes:
      raise TaskMoEError(f"site {self.site!r}: site_inputs['layer_routes'][{stack!r}] "
                         f"[B, n_layers, {m}] is required")
    r = routes[stack]
    if r.ndim != 3 or r.shape[0] != x.shape[0] or r.shape[2] != m or index >= r.shape[1]:
      raise TaskMoEError(f"site {self.site!r}: site_inputs['layer_routes'][{stack!r}] must be "
                         f"[{x.shape[0]}, >{index}, {m}], got {tuple(r.shape)}")
    w = jnp.asarray(r[:, index, :], self.dtype)  # [B, m]
    mixed = jnp.einsum("be,edf->bdf", w, jnp.asarray(experts, self.dtype))  # [B, D, F]
    return jnp.einsum("b...d,bdf->b...f", jnp.asarray(x, self.dtype), mixed)


def make_task_moe_site_factory(cfg: TaskMoEConfig) -> layers.SiteFactory:
  """Site factory: `TaskMoESite` at sites matching ``cfg.site_pattern``, plain dense elsewhere."""
  pattern = re.compile(cfg.site_pattern)

  def factory(spec: layers.SiteSpec, name: str) -> nn.Module:
    if not pattern.fullmatch(spec.site):
      return layers.dense_site(spec, name)
    return TaskMoESite(features=spec.features, kernel_axes=spec.kernel_axes, site=spec.site,
                       dtype=spec.dtype, param_dtype=spec.param_dtype,
                       kernel_init=spec.kernel_init, num_experts=cfg.num_experts, name=name)

  return factory


class TaskMoERouter(nn.Module):
  """Layer-specific router MLPs: task representation [B, task_dim] -> logits per layer.

  Attributes:
    config: `TaskMoEConfig`.
    num_encoder_layers, num_decoder_layers: the T5 stacks' depths.
  """
  config: TaskMoEConfig
  num_encoder_layers: int
  num_decoder_layers: int

  @nn.compact
  def __call__(self, task_ids: Optional[Array] = None,
               task_repr: Optional[Array] = None) -> dict:
    """Returns {'encoder': [B, n_enc, m], 'decoder': [B, n_dec, m]} float32 logits."""
    cfg = self.config
    if cfg.task_repr == "embedding":
      if task_ids is None:
        raise TaskMoEError("TaskMoERouter: task_ids [B] is required for task_repr='embedding'")
      table = self.param("task_embedding", nn.initializers.normal(1.0),
                         (cfg.num_tasks, cfg.task_dim), jnp.float32)
      rep = jnp.take(table, jnp.asarray(task_ids, jnp.int32), axis=0)  # [B, task_dim]
    else:
      if task_repr is None or task_repr.shape[-1] != cfg.task_dim:
        raise TaskMoEError(f"TaskMoERouter: task_repr [B, {cfg.task_dim}] is required for "
                           f"task_repr='input'")
      rep = jnp.asarray(task_repr, jnp.float32)
    n = self.num_encoder_layers + self.num_decoder_layers
    h = nn.DenseGeneral((n, cfg.router_hidden_dim), dtype=jnp.float32, name="hidden")(rep)
    h = _ACTIVATIONS[cfg.router_activation](h)  # [B, n, hidden], one MLP per layer
    w2 = self.param("out_kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                    (n, cfg.router_hidden_dim, cfg.num_experts), jnp.float32)
    b2 = self.param("out_bias", nn.initializers.zeros, (n, cfg.num_experts), jnp.float32)
    logits = jnp.einsum("bnh,nhe->bne", h, w2) + b2  # [B, n, m]
    return {"encoder": logits[:, :self.num_encoder_layers],
            "decoder": logits[:, self.num_encoder_layers:]}


def task_routes(router: TaskMoERouter, router_variables: Mapping[str, Any],
                task_ids: Optional[Array] = None, task_repr: Optional[Array] = None) -> dict:
  """Frozen stage-2 routes: one-hot argmax per task, {stack: [T, n, m]} (row t = task_ids[t])."""
  logits = router.apply(router_variables, task_ids, task_repr)
  return routes_from_logits(logits, "argmax")


def task_logits(router: TaskMoERouter, router_variables: Mapping[str, Any],
                task_ids: Optional[Array] = None, task_repr: Optional[Array] = None) -> dict:
  """Frozen router logits per task, {stack: [T, n, m]} float32 (row t = task t)."""
  return {k: jnp.asarray(v, jnp.float32)
          for k, v in router.apply(router_variables, task_ids, task_repr).items()}


def stage2_frozen(router: TaskMoERouter, router_variables: Mapping[str, Any], cfg: TaskMoEConfig,
                  task_ids: Optional[Array] = None, task_repr: Optional[Array] = None) -> dict:
  """What stage 2 keeps fixed per task: logits ('softmax') or one-hot routes ('argmax')."""
  logits = task_logits(router, router_variables, task_ids, task_repr)
  return logits if cfg.stage2_routes == "softmax" else routes_from_logits(logits, "argmax")


def stage2_step_routes(frozen: Mapping[str, Array], task_ids: Array, step: Union[int, Array],
                       cfg: TaskMoEConfig) -> dict:
  """Stage-2 training routes of a batch, {stack: [B, n, m]}: ``softmax(logits / tau2(step))``
  with tau2 = ``temperature_schedule(step, stage2_initial_tau, stage2_minimum_tau,
  stage2_anneal_rate)``, or the frozen one-hot routes for ``stage2_routes='argmax'``."""
  rows = fixed_routes(frozen, task_ids)  # [B, n, m] logits or one-hot routes
  if cfg.stage2_routes == "argmax":
    return rows
  tau2 = temperature_schedule(step, cfg.stage2_initial_tau, cfg.stage2_minimum_tau,
                              cfg.stage2_anneal_rate)
  return routes_from_logits(rows, "softmax", tau2)


def stage2_eval_routes(logits: Mapping[str, Array], cfg: TaskMoEConfig) -> dict:
  """Routes after stage 2: ``softmax(logits / stage2_minimum_tau)`` or one-hot argmax."""
  if cfg.stage2_routes == "softmax":
    return routes_from_logits(logits, "softmax", cfg.stage2_minimum_tau)
  return routes_from_logits(logits, "argmax")


def fixed_routes(frozen: Mapping[str, Array], task_ids: Array) -> dict:
  """Gathers frozen per-task rows {stack: [T, n, m]} (routes or logits) for task ids [B]."""
  ids = jnp.asarray(task_ids, jnp.int32)
  return {k: jnp.take(jnp.asarray(v), ids, axis=0) for k, v in frozen.items()}


def reinit_experts(params: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict:
  """Every site's ``experts_kernel`` [m, D, F] <- m copies of its base ``kernel`` in ``params``."""
  def walk(p, a, path):
    if not isinstance(a, Mapping):
      return a
    out = {}
    for k, v in a.items():
      if k == "experts_kernel":
        if not isinstance(p, Mapping) or "kernel" not in p:
          raise TaskMoEError(f"reinit_experts: no params kernel at {'/'.join(path)}")
        out[k] = jnp.broadcast_to(jnp.asarray(p["kernel"]), v.shape).astype(v.dtype)
      else:
        out[k] = walk(p.get(k) if isinstance(p, Mapping) else None, v, path + (k,))
    return out
  return walk(params, adapters, ())


def mean_pooled_encoding(model: nn.Module, variables: Mapping[str, Any], tokens: Array,
                         site_inputs: Optional[dict] = None) -> Array:
  """Mean of the encoder outputs over non-pad tokens: [B, L] -> [B, D] (a text task repr)."""
  encoded = model.apply(dict(variables), tokens, enable_dropout=False, site_inputs=site_inputs,
                        method=model.encode)  # [B, L, D]
  mask = (tokens > 0).astype(jnp.float32)[..., None]
  return (encoded.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def average_relative_gain(scores: Union[Mapping[str, float], Sequence[float]],
                          baseline_scores: Union[Mapping[str, float], Sequence[float]],
                          percent: bool = False) -> float:
  """ARG = mean over tasks of (s - b) / b (x100 if ``percent``). Dicts are matched by task name."""
  if isinstance(scores, Mapping) != isinstance(baseline_scores, Mapping):
    raise TaskMoEError("average_relative_gain: scores and baseline_scores must both be dicts or "
                       "both sequences")
  if isinstance(scores, Mapping):
    if set(scores) != set(baseline_scores):
      raise TaskMoEError(f"average_relative_gain: task names differ: "
                         f"{sorted(set(scores) ^ set(baseline_scores))}")
    names = sorted(scores)
    s = np.array([scores[n] for n in names], np.float64)
    b = np.array([baseline_scores[n] for n in names], np.float64)
  else:
    s, b = np.asarray(scores, np.float64), np.asarray(baseline_scores, np.float64)
    if s.shape != b.shape or s.ndim != 1:
      raise TaskMoEError(f"average_relative_gain: scores {s.shape} and baseline_scores {b.shape} "
                         "must be 1-D of equal length")
  if s.size == 0:
    raise TaskMoEError("average_relative_gain: no tasks")
  if np.any(b == 0):
    raise TaskMoEError("average_relative_gain: a baseline score is 0 (relative gain undefined)")
  arg = float(np.mean((s - b) / b))
  return 100.0 * arg if percent else arg


# ----------------------------------------------------------------------------------------------
# Training: one jitted step per stage.


def task_moe_optimizer(cfg: TaskMoEConfig,
                       total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """Clip (``clip_norm``) then AdamW with per-group lrs over {'params', 'adapters', 'router'}.

  As the official ``get_optimizer_and_scheduler``: one AdamW (eps 1e-8, ``weight_decay``) with the
  model, router and task-embedding learning rates, global-norm clipping, and with ``total_steps``
  a linear warm-up over ``warmup_ratio * total_steps`` followed by a linear decay to 0 (None:
  constant rates). The base ``kernel`` of an expert site is not used by the forward pass (its
  ``experts_kernel`` copies are); it gets no update at all, so decoupled weight decay does not
  shrink it away from the pre-trained value.
  """
  if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(
      total_steps, int) or total_steps < 1):
    raise TaskMoEError(f"task_moe_optimizer: total_steps must be None or a positive int, got "
                       f"{total_steps!r}")

  def schedule(peak: float):
    if total_steps is None:
      return peak
    warm = int(total_steps * cfg.warmup_ratio)
    decay = optax.linear_schedule(peak, 0.0, max(total_steps - warm, 1))
    if warm == 0:
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])

  def label(tree):
    expert_sites = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(tree.get(ADAPTERS, {}))[0]:
      keys = tuple(str(getattr(k, "key", k)) for k in path)
      if keys[-1] == "experts_kernel":
        expert_sites.add(keys[:-1])

    def leaf_label(path, _):
      keys = tuple(str(getattr(k, "key", k)) for k in path)
      if keys[0] == "router":
        return "task_embedding" if "task_embedding" in keys else "router"
      if keys[0] == "params" and keys[-1] == "kernel" and keys[1:-1] in expert_sites:
        return "unused"
      return "model"
    return jax.tree_util.tree_map_with_path(leaf_label, tree)

  adamw = lambda lr: optax.adamw(schedule(lr), eps=1e-8, weight_decay=cfg.weight_decay)
  tx = optax.multi_transform({"model": adamw(cfg.learning_rate),
                              "router": adamw(cfg.router_learning_rate),
                              "task_embedding": adamw(cfg.task_embedding_learning_rate),
                              "unused": optax.set_to_zero()}, label)
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx) if cfg.clip_norm else tx


def make_train_step(model: nn.Module, router: TaskMoERouter, tx: optax.GradientTransformation,
                    cfg: TaskMoEConfig, stage: int = 1):
  """A jitted ``step(trainable, opt_state, frozen, batch, step, rng) -> (trainable, opt_state, loss)``.

  Stage 1: ``trainable = {'params', 'adapters', 'router'}`` (router variables' 'params'); routes are
  straight-through Gumbel samples at ``temperature_schedule(step)``. Stage 2: ``trainable =
  {'params', 'adapters'}`` (router frozen), ``frozen = stage2_frozen(...)``: routes are
  ``softmax(logits[task] / tau2(step))`` with the ``stage2_*`` temperature schedule, or the
  fixed one-hot argmax routes with ``stage2_routes='argmax'``.
  ``batch`` holds the feature-converter arrays plus ``task_ids`` [B] (and ``task_repr`` [B, d] for
  ``task_repr='input'``).
  """
  if stage not in (1, 2):
    raise TaskMoEError(f"make_train_step.stage must be 1 or 2, got {stage!r}")

  def loss_fn(trainable, frozen, batch, step, rng):
    r_rng, d_rng = jax.random.split(rng)
    if stage == 1:
      logits = router.apply({"params": trainable["router"]}, batch.get("task_ids"),
                            batch.get("task_repr"))
      tau = temperature_schedule(step, cfg.initial_tau, cfg.minimum_tau, cfg.anneal_rate)
      routes = routes_from_logits(logits, "gumbel_st", tau, r_rng)
    else:
      routes = stage2_step_routes(frozen, batch["task_ids"], step, cfg)
    out = model.apply({"params": trainable["params"], ADAPTERS: trainable[ADAPTERS]},
                      batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                      batch["decoder_target_tokens"], enable_dropout=True,
                      site_inputs={"layer_routes": routes}, rngs={"dropout": d_rng})
    targets = batch["decoder_target_tokens"]
    return cross_entropy_loss(out, targets, batch.get("decoder_loss_weights", targets > 0))[0]

  @jax.jit
  def step_fn(trainable, opt_state, frozen, batch, step, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, step, rng)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step_fn
