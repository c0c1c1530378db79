"""Polytropon (Poly) and Multi-Head Routing (MHR): task-routed inventories of LoRA skills.

Papers: Ponti et al. 2023, "Combining parameter-efficient modules for task-level generalisation"
(Poly, sec. 3) and Caccia et al. 2023, "Multi-head adapter routing for cross-task generalization"
(MHR, sec. 3-4). Conventions follow the official code, microsoft/mttl (``PolytroponSelector`` in
``mttl/models/modifiers/poly.py`` and ``SkilledLoRA`` in ``mttl/models/modifiers/lora.py``):

* every site holds K LoRA skills ``skills_a`` [K, D, R], ``skills_b`` [K, R, F] and its own routing
  logits ``module_logits`` Z [T, H, K] (T tasks, H heads; H = 1 is Poly, H > 1 is MHR, mttl's
  ``n_splits``). Poly is thus the H = 1 case of one code path.
* weights of example b: w = g(Z[task_ids[b]]) with g = Gumbel-sigmoid (``RelaxedBernoulli`` with
  temperature 1, a reparameterised sample) in training and plain ``sigmoid`` at evaluation; then
  w <- w / (sum_k w + EPS) with ``EPS = 1e-12`` (mttl ``global_vars.EPS``).
* A and B are mixed separately: head h mixes the h-th block of D rows of A and the h-th block of F
  columns of B with its own weights w[:, h, :] (mttl reshapes D -> (H, D/H) and F -> (H, F/H), so
  blocks are contiguous); then delta(u) = (u @ A_mix) @ B_mix * scale.
* Z ~ U(-1e-3, 1e-3) (mttl ``module_logits.uniform_(-1e-3, 1e-3)``); skills: A ~ U(-b, b) with
  b = 1 / sqrt(3 D) (mttl: torch kaiming-uniform gain for ``leaky_relu(sqrt 5)`` over ``in_features``),
  B = 0; ``skill_init='normal'`` uses PHATGOOSE's N(0, init_std^2) instead.
* the routing logits get a higher learning rate (mttl ``module_logits_learning_rate = 0.1``, with
  ``learning_rate`` 1e-3 for the skills; both AdamW, no weight decay on Z): `poly_optimizer`.

Variants: Poly-mu / MHR-mu (``routing='uniform'``: every skill weighted 1/K, or `merge_skills` to one
LoRA to fine-tune), MHR-z (few-shot: train only the new task's Z row, `adapt_to_new_task` with
``train='z'``; `z_row_mask`). Stochastic routing needs ``site_inputs['training'] = True`` (a Python
bool) and a ``'routing'`` rng.

Letters: B batch, L tokens, D site input, F site output, R LoRA rank, K skills, H heads, T tasks.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

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
Z_LEAF = "module_logits"
EPS = 1e-12
ALL_SITES = r"(encoder|decoder)/layers_\d+/.*"


class PolytroponError(ValueError):
  """A Poly/MHR setting or input is invalid (the message names the field or key)."""


@gin.configurable(module="phatgoose_jax.methods")
@dataclasses.dataclass(frozen=True)
class PolytroponConfig:
  """Shapes and routing of Poly / MHR sites.

  Attributes:
    num_tasks: T, rows of Z (training tasks; `add_task_rows` appends rows for new tasks).
    num_skills: K (Ponti et al. use an inventory of 8 skills).
    num_heads: H (1 = Poly; MHR splits D and F into H blocks, so H must divide both).
    rank: R of each skill.
    scale: multiplier of the update; None = 1/R (the package's LoRA convention; mttl uses
      ``lora_alpha / rank``).
    skill_init: 'kaiming_uniform' (mttl) or 'normal' (N(0, init_std^2), PHATGOOSE).
    init_std: std of ``skills_a`` for ``skill_init='normal'``.
    z_init_range: Z ~ U(-z_init_range, z_init_range).
    routing: 'learned' (Poly / MHR) or 'uniform' (Poly-mu / MHR-mu: weights 1/K, Z unused).
    temperature: relaxed-Bernoulli temperature in training (1.0 in mttl).
    site_pattern: regex (fullmatch) over site names; others stay plain dense sites.
  """
  num_tasks: int = 1
  num_skills: int = 8
  num_heads: int = 1
  rank: int = 16
  scale: Optional[float] = None
  skill_init: str = "kaiming_uniform"
  init_std: float = 0.01
  z_init_range: float = 1e-3
  routing: str = "learned"
  temperature: float = 1.0
  site_pattern: str = ALL_SITES

  def __post_init__(self):
    for field in ("num_tasks", "num_skills", "num_heads", "rank"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolytroponError(f"PolytroponConfig.{field} must be a positive int, got {value!r}")
    if self.skill_init not in ("kaiming_uniform", "normal"):
      raise PolytroponError(f"PolytroponConfig.skill_init must be 'kaiming_uniform' or 'normal', "
                            f"got {self.skill_init!r}")
    if self.routing not in ("learned", "uniform"):
      raise PolytroponError(f"PolytroponConfig.routing must be 'learned' or 'uniform', "
                            f"got {self.routing!r}")
    if not self.temperature > 0:
      raise PolytroponError(f"PolytroponConfig.temperature must be > 0, got {self.temperature!r}")


def gumbel_sigmoid(rng: Array, logits: Array, temperature: float = 1.0) -> Array:
  """A reparameterised RelaxedBernoulli(temperature, logits) sample, in float32.

  sigmoid((logits + log u - log(1 - u)) / temperature), u ~ U(0, 1). Note that P(sample > 1/2) is
  exactly sigmoid(logits), while the mean E[sample] is only sigmoid(logits) at logits = 0.
  """
  logits = jnp.asarray(logits, jnp.float32)
  u = jax.random.uniform(rng, logits.shape, jnp.float32, minval=np.finfo(np.float32).tiny,
                         maxval=1.0)
  noise = jnp.log(u) - jnp.log1p(-u)  # standard logistic
  return jax.nn.sigmoid((logits + noise) / temperature)


def check_task_ids(task_ids: Any, num_tasks: int, where: str) -> None:
  """Raises `PolytroponError` naming ``where`` if concrete ``task_ids`` leave ``[0, num_tasks)``."""
  if isinstance(task_ids, jax.core.Tracer):
    return
  ids = np.asarray(task_ids)
  if ids.size and (ids.min() < 0 or ids.max() >= num_tasks):
    bad = sorted({int(i) for i in ids.ravel() if not 0 <= i < num_tasks})
    raise PolytroponError(f"{where}: task ids {bad[:8]} are outside [0, {num_tasks}) (Z has "
                          f"{num_tasks} task rows; add rows for new tasks with add_task_rows)")


def normalize_weights(probs: Array) -> Array:
  """w / (sum_k w + EPS) over the last (skills) axis, EPS = 1e-12 as mttl."""
  return probs / (jnp.sum(probs, axis=-1, keepdims=True) + EPS)


def routing_weights(z: Array, task_ids: Array, *, training: bool = False,
                    rng: Optional[Array] = None, temperature: float = 1.0) -> Array:
  """Normalised skill weights [B, H, K] of the tasks ``task_ids`` [B] from Z [T, H, K] (float32).

  Concrete ``task_ids`` outside ``[0, T)`` raise `PolytroponError` (a held-out task needs a row:
  `add_task_rows`); traced ids cannot be checked, and an out-of-range id there gives NaN weights
  (``jnp.take`` fill mode), never another task's row.
  """
  z = jnp.asarray(z, jnp.float32)
  check_task_ids(task_ids, z.shape[0], "task_ids")
  logits = jnp.take(z, task_ids, axis=0, mode="fill", fill_value=jnp.nan)  # [B, H, K]
  if training:
    if rng is None:
      raise PolytroponError("routing_weights: training=True needs an rng")
    probs = gumbel_sigmoid(rng, logits, temperature)
  else:
    probs = jax.nn.sigmoid(logits)
  return normalize_weights(probs)


def mix_skills(weights: Array, skills_a: Array, skills_b: Array) -> Tuple[Array, Array]:
  """Per-example mixed LoRA factors: A_mix [B, D, R], B_mix [B, R, F].

  Args:
    weights: [B, H, K]; head h mixes rows h*D/H:(h+1)*D/H of A and columns h*F/H:(h+1)*F/H of B.
    skills_a: [K, D, R].
    skills_b: [K, R, F].
  """
  b, h, k = weights.shape
  _, d, r = skills_a.shape
  f = skills_b.shape[-1]
  a = skills_a.reshape(k, h, d // h, r)  # [K, H, D/H, R]
  bb = skills_b.reshape(k, r, h, f // h)  # [K, R, H, F/H]
  weights = weights.astype(skills_a.dtype)
  a_mix = jnp.einsum("bhk,khdr->bhdr", weights, a).reshape(b, d, r)  # [B, D, R]
  b_mix = jnp.einsum("bhk,krhf->brhf", weights, bb).reshape(b, r, f)  # [B, R, F]
  return a_mix, b_mix


def _skills_a_init(cfg_init: str, std: float):
  def init(rng, shape, dtype):
    if cfg_init == "normal":
      return std * jax.random.normal(rng, shape, dtype)
    bound = 1.0 / np.sqrt(3.0 * shape[1])  # kaiming-uniform, a = sqrt(5), fan_in = D
    return jax.random.uniform(rng, shape, dtype, -bound, bound)
  return init


class PolySite(layers.DenseSite):
  """Base projection plus a task-routed mixture of K LoRA skills (Poly, or MHR with H > 1).

  ``y = u @ kernel + (u @ A_mix[b]) @ B_mix[b] * scale`` for every token u of example b.
  Reads ``site_inputs['task_ids']`` [B] (required for ``routing='learned'``) and
  ``site_inputs['training']`` (Python bool, default False).
  """
  poly: PolytroponConfig = PolytroponConfig()

  @property
  def lora_scale(self) -> float:
    return 1.0 / self.poly.rank if self.poly.scale is None else float(self.poly.scale)

  def _variables(self, dim_in: int):
    cfg = self.poly
    kin, kout = self.kernel_axes
    for name, dim in (("D", dim_in), ("F", self.features)):
      if dim % cfg.num_heads:
        raise PolytroponError(f"site {self.site!r}: PolytroponConfig.num_heads={cfg.num_heads} "
                              f"must divide {name}={dim}")
    k, r = cfg.num_skills, cfg.rank
    a_init = _skills_a_init(cfg.skill_init, cfg.init_std)
    skills_a = nn_partitioning.variable_with_axes(
        ADAPTERS, "skills_a", lambda: a_init(self.make_rng("params"), (k, dim_in, r),
                                             self.param_dtype),
        axes=("expert", kin, "lora_rank")).value
    skills_b = nn_partitioning.variable_with_axes(
        ADAPTERS, "skills_b", lambda: jnp.zeros((k, r, self.features), self.param_dtype),
        axes=("expert", "lora_rank", kout)).value
    z = nn_partitioning.variable_with_axes(
        ADAPTERS, Z_LEAF, lambda: jax.random.uniform(
            self.make_rng("params"), (cfg.num_tasks, cfg.num_heads, k), jnp.float32,
            -cfg.z_init_range, cfg.z_init_range),
        axes=("task", "routing_head", "expert")).value
    want = {"skills_a": (k, dim_in, r), "skills_b": (k, r, self.features),
            Z_LEAF: (None, cfg.num_heads, k)}
    for name, value in (("skills_a", skills_a), ("skills_b", skills_b), (Z_LEAF, z)):
      shape = tuple(jnp.shape(value))
      if len(shape) != 3 or any(w is not None and w != g for w, g in zip(want[name], shape)):
        wanted = "[" + ", ".join("T" if w is None else str(w) for w in want[name]) + "]"
        raise PolytroponError(
            f"site {self.site!r}: adapters {name} must be {wanted} (PolytroponConfig: "
            f"num_skills={k}, rank={r}, num_heads={cfg.num_heads}; D={dim_in}, "
            f"F={self.features}), got {list(shape)}")
    return skills_a, skills_b, z

  @nn.compact
  def __call__(self, x: Array, **site_inputs) -> Array:
    """x [B, ..., D] -> [B, ..., F]."""
    cfg = self.poly
    y = self.base_projection(x)
    skills_a, skills_b, z = self._variables(x.shape[-1])
    training = site_inputs.get("training", False)
    if not isinstance(training, (bool, np.bool_)):
      raise PolytroponError(f"site {self.site!r}: site_inputs['training'] must be a Python bool "
                            f"(static), got {type(training).__name__}")
    batch = x.shape[0]
    if cfg.routing == "uniform":
      weights = jnp.full((batch, cfg.num_heads, cfg.num_skills), 1.0 / cfg.num_skills,
                         jnp.float32)
    else:
      if "task_ids" not in site_inputs:
        raise PolytroponError(f"site {self.site!r}: site_inputs['task_ids'] [B] is required "
                              f"for routing='learned'")
      task_ids = jnp.asarray(site_inputs["task_ids"]).astype(jnp.int32)
      if task_ids.shape != (batch,):
        raise PolytroponError(f"site {self.site!r}: site_inputs['task_ids'] must have shape "
                              f"({batch},), got {task_ids.shape}")
      check_task_ids(site_inputs["task_ids"], z.shape[0],
                     f"site {self.site!r}: site_inputs['task_ids']")
      rng = None
      if training:
        if not self.has_rng("routing"):
          raise PolytroponError(f"site {self.site!r}: site_inputs['training']=True needs a "
                                "'routing' rng (apply(..., rngs={'routing': key}))")
        rng = self.make_rng("routing")
      weights = routing_weights(z, task_ids, training=bool(training), rng=rng,
                                temperature=cfg.temperature)  # [B, H, K]
    a_mix, b_mix = mix_skills(weights, jnp.asarray(skills_a, self.dtype),
                              jnp.asarray(skills_b, self.dtype))
    u = jnp.asarray(x, self.dtype)
    h = jnp.einsum("b...d,bdr->b...r", u, a_mix)  # [B, ..., R]
    delta = jnp.einsum("b...r,brf->b...f", h, b_mix)  # [B, ..., F]
    return y + delta * jnp.asarray(self.lora_scale, self.dtype)


def make_poly_site_factory(cfg: PolytroponConfig) -> layers.SiteFactory:
  """Site factory: `PolySite` at sites fully matching ``cfg.site_pattern``, plain dense elsewhere."""
  pattern = re.compile(cfg.site_pattern)

  def factory(spec: layers.SiteSpec, name: str) -> nn.Module:
    if not pattern.fullmatch(spec.site):
      return layers.dense_site(spec, name)
    return PolySite(features=spec.features, kernel_axes=spec.kernel_axes, site=spec.site,
                    dtype=spec.dtype, param_dtype=spec.param_dtype,
                    kernel_init=spec.kernel_init, poly=cfg, name=name)

  return factory


# ----------------------------------------------------------------------------------------------
# Tree helpers over the `adapters` collection (nested dicts ending in site dicts).


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def _map_sites(fn: Callable[[dict], dict], tree: Any) -> Any:
  """Applies ``fn`` to every dict holding a ``module_logits`` leaf (a Poly site)."""
  if isinstance(tree, Mapping):
    if Z_LEAF in tree:
      return fn(dict(tree))
    return {k: _map_sites(fn, v) for k, v in tree.items()}
  return tree


def add_task_rows(adapters: Any, num_new: int = 1, init: str = "uniform",
                  rng: Optional[Array] = None, z_init_range: float = 1e-3) -> Any:
  """Appends ``num_new`` rows to every site's Z (new tasks get ids T, T+1, ...).

  Args:
    init: 'uniform' (zero logits: sigmoid 1/2 for every skill, i.e. uniform routing, the MHR-mu
      start), 'mean' (average of the training rows' logits) or 'random' (U(-r, r) as at init).
  """
  if init not in ("uniform", "mean", "random"):
    raise PolytroponError(f"add_task_rows.init must be 'uniform', 'mean' or 'random', got {init!r}")
  if init == "random" and rng is None:
    raise PolytroponError("add_task_rows: init='random' needs an rng")
  counter = [0]

  def grow(site: dict) -> dict:
    z = jnp.asarray(site[Z_LEAF])
    shape = (num_new,) + z.shape[1:]
    if init == "uniform":
      rows = jnp.zeros(shape, z.dtype)
    elif init == "mean":
      rows = jnp.broadcast_to(z.mean(axis=0, keepdims=True), shape).astype(z.dtype)
    else:
      counter[0] += 1
      rows = jax.random.uniform(jax.random.fold_in(rng, counter[0]), shape, z.dtype,
                                -z_init_range, z_init_range)
    site[Z_LEAF] = jnp.concatenate([z, rows], axis=0)
    return site

  return _map_sites(grow, adapters)


def trainable_mask(adapters: Any, what: str = "all", row: Optional[int] = None) -> Any:
  """Float mask tree (1 = trained) over the adapters tree.

  Args:
    what: 'all' (Z and skills), 'z' (routing logits only), 'skills' (skills only), 'z_row'
      (MHR-z: only row ``row`` of every Z; all other leaves and rows 0).
    row: the task row for 'z_row'.
  """
  if what not in ("all", "z", "skills", "z_row"):
    raise PolytroponError(f"trainable_mask.what must be 'all', 'z', 'skills' or 'z_row', "
                          f"got {what!r}")
  if what == "z_row" and row is None:
    raise PolytroponError("trainable_mask: what='z_row' needs row")
  if what == "z_row":
    rows = {int(jnp.shape(leaf)[0]) for path, leaf in
            jax.tree_util.tree_flatten_with_path(adapters)[0] if _leaf_name(path) == Z_LEAF}
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or any(
        not 0 <= row < n for n in rows):
      raise PolytroponError(f"trainable_mask: row={row!r} must be an int in [0, T) for every "
                            f"site's Z (task rows: {sorted(rows)})")

  def leaf_mask(path, leaf):
    is_z = _leaf_name(path) == Z_LEAF
    if what == "all":
      return jnp.ones((), jnp.float32)
    if what == "z":
      return jnp.asarray(float(is_z), jnp.float32)
    if what == "skills":
      return jnp.asarray(float(not is_z), jnp.float32)
    if not is_z:
      return jnp.zeros((), jnp.float32)
    m = jnp.zeros(jnp.shape(leaf)[:1], jnp.float32).at[row].set(1.0)
    return m.reshape((-1,) + (1,) * (jnp.ndim(leaf) - 1))

  return jax.tree_util.tree_map_with_path(leaf_mask, adapters)


def merge_skills(adapters: Any, weights: Optional[Array] = None) -> Any:
  """Collapses every site's skills into one LoRA (``lora_a`` [D, R], ``lora_b`` [R, F]).

  ``weights`` [H, K] (default uniform 1/K: Poly-mu / MHR-mu's averaged adapter); head h's blocks are
  mixed with weights[h]. The result uses the package's single-LoRA leaf names and carries no
  scale: apply it with the Poly sites' multiplier (``PolytroponConfig.scale``, default 1/rank).
  """
  def merge(site: dict) -> dict:
    k, h = site[Z_LEAF].shape[2], site[Z_LEAF].shape[1]
    if weights is None:
      w = jnp.full((1, h, k), 1.0 / k)
    else:
      w = jnp.asarray(weights)
      if w.shape != (h, k) or not jnp.issubdtype(w.dtype, jnp.number):
        raise PolytroponError(f"merge_skills: weights must be numeric [H={h}, K={k}], got shape "
                              f"{w.shape} dtype {w.dtype}")
      w = w[None]
    a, b = mix_skills(w, jnp.asarray(site["skills_a"]), jnp.asarray(site["skills_b"]))
    return {"lora_a": a[0], "lora_b": b[0]}
  return _map_sites(merge, adapters)


# ----------------------------------------------------------------------------------------------
# Optimisation and few-shot adaptation.


@gin.configurable(module="phatgoose_jax.methods")
def poly_optimizer(learning_rate: float = 1e-3, z_learning_rate: float = 0.1,
                   weight_decay: float = 0.0, clip_norm: Optional[float] = None,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW with a separate (higher) learning rate for the ``module_logits`` leaves (mttl).

  Labels leaves by name, so it applies to an adapters tree or a whole variables dict alike. Z never
  gets weight decay (mttl's ``module_logits`` group has weight_decay 0).

  Only the two learning rates (1e-3 skills, 0.1 Z) and AdamW come from mttl. Its training scripts
  differ between versions in the rest (weight decay 0 or 0.01 on the skills, a linear schedule
  with 6% warm-up, gradient clipping in some trainers); these defaults use a constant rate, no
  decay and no clipping. Set ``weight_decay`` / ``clip_norm`` to match a given mttl run; a
  schedule can be passed as ``learning_rate`` (an optax schedule).
  """
  if any(not callable(v) and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                                 or not v > 0)
         for v in (learning_rate, z_learning_rate)):
    raise PolytroponError(f"poly_optimizer: learning_rate and z_learning_rate must be > 0, got "
                          f"{learning_rate!r}, {z_learning_rate!r}")
  label = lambda tree: jax.tree_util.tree_map_with_path(
      lambda p, _: "z" if _leaf_name(p) == Z_LEAF else "skills", tree)
  tx = optax.multi_transform({
      "z": optax.adam(z_learning_rate, eps=eps),
      "skills": optax.adamw(learning_rate, eps=eps, weight_decay=weight_decay)}, label)
  return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


@gin.configurable(module="phatgoose_jax.methods")
@dataclasses.dataclass(frozen=True)
class PolyAdaptConfig:
  """Few-shot adaptation to a new task (Ponti et al. sec. 5; Caccia et al. MHR-z / MHR-mu).

  Attributes:
    train: 'z' (MHR-z: only the new Z row), 'z_and_skills' (Poly fine-tuning) or 'skills'.
    new_row_init: see `add_task_rows` ('uniform' is the MHR-mu start).
    steps, learning_rate, z_learning_rate: the optax loop (`poly_optimizer`).
  """
  train: str = "z_and_skills"
  new_row_init: str = "uniform"
  steps: int = 100
  learning_rate: float = 1e-3
  z_learning_rate: float = 0.1

  def __post_init__(self):
    if self.train not in ("z", "z_and_skills", "skills"):
      raise PolytroponError(f"PolyAdaptConfig.train must be 'z', 'z_and_skills' or 'skills', "
                            f"got {self.train!r}")
    if self.steps < 0:
      raise PolytroponError(f"PolyAdaptConfig.steps must be >= 0, got {self.steps!r}")


# Times the adaptation step was traced (the cache below keeps it at one per model / config /
# shapes; tests read it).
ADAPT_STEP_TRACES = [0]


@functools.lru_cache(maxsize=32)
def _adapt_step(model: nn.Module, config: "PolyAdaptConfig", enable_dropout: bool):
  """(optimiser, jitted step) of `adapt_to_new_task`, built once per (model, config, dropout).

  Everything that varies between calls (base params, adapters, the trainable mask, the new
  task id, the batch, the rng) is an argument, so repeated adaptations with the same shapes
  (e.g. one new task at a time from the same trained inventory) reuse one compilation.
  """
  tx = poly_optimizer(config.learning_rate, config.z_learning_rate)

  def loss_fn(adapters, params, batch, step_rng, new_id):
    ids = jnp.full((batch["encoder_input_tokens"].shape[0],), new_id, jnp.int32)
    r_rng, d_rng = jax.random.split(step_rng)
    logits = model.apply({"params": params, ADAPTERS: adapters}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                         enable_dropout=enable_dropout,
                         site_inputs={"task_ids": ids, "training": True},
                         rngs={"routing": r_rng, "dropout": d_rng})
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights", targets > 0)
    return cross_entropy_loss(logits, targets, weights)[0]

  @jax.jit
  def step(adapters, opt_state, params, mask, batch, step_rng, new_id):
    ADAPT_STEP_TRACES[0] += 1
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params, batch, step_rng, new_id)
    grads = jax.tree.map(lambda g, m: g * m, grads, mask)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    updates = jax.tree.map(lambda u, m: u * m, updates, mask)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return tx, step


def adapt_to_new_task(model: nn.Module, variables: Mapping[str, Any],
                      batches: Sequence[Mapping[str, Array]], rng: Array,
                      config: PolyAdaptConfig = PolyAdaptConfig(),
                      enable_dropout: bool = False) -> Tuple[dict, int, list]:
  """Adds a Z row for a new task and trains it (and/or the skills) on ``batches``.

  Args:
    model: a `Transformer` built with `make_poly_site_factory`.
    variables: {'params': ..., 'adapters': ...} (other collections pass through).
    batches: feature-converter batches (``encoder_input_tokens``, ``decoder_input_tokens``,
      ``decoder_target_tokens``, optional ``decoder_loss_weights``), cycled for ``config.steps``.
    rng: for the Gumbel-sigmoid ('routing') and dropout.
  Returns:
    (new variables, the new task id, list of per-step float losses).

  The step is compiled once per (model, config, enable_dropout) and input shapes, so adapting
  to several new tasks one at a time from the same inventory compiles once.
  """
  if not batches:
    raise PolytroponError("adapt_to_new_task: batches must be a non-empty sequence")
  rng, init_rng = jax.random.split(rng)
  adapters = add_task_rows(variables[ADAPTERS], 1, config.new_row_init, init_rng)
  new_id = int(_z_leaves(adapters)[0].shape[0]) - 1
  if config.train == "z_and_skills":
    mask = jax.tree_util.tree_map_with_path(  # skills + the new row of Z only
        lambda p, leaf, m_row: m_row if _leaf_name(p) == Z_LEAF else jnp.ones((), jnp.float32),
        adapters, trainable_mask(adapters, "z_row", new_id))
  else:
    mask = trainable_mask(adapters, "z_row" if config.train == "z" else "skills", new_id)
  tx, step = _adapt_step(model, config, enable_dropout)
  opt_state = tx.init(adapters)
  params = variables["params"]
  new_id_arr = jnp.asarray(new_id, jnp.int32)

  losses = []
  for i in range(config.steps):
    batch = {k: jnp.asarray(v) for k, v in batches[i % len(batches)].items()}
    adapters, opt_state, loss = step(adapters, opt_state, params, mask, batch,
                                     jax.random.fold_in(rng, i), new_id_arr)
    losses.append(float(loss))
  out = dict(variables)
  out[ADAPTERS] = adapters
  return out, new_id, losses


def _z_leaves(adapters: Any) -> list:
  found = []
  _map_sites(lambda site: found.append(site[Z_LEAF]) or site, adapters)
  if not found:
    raise PolytroponError("adapters tree has no 'module_logits' leaf (no Poly site)")
  return found
