"""Few-shot weight-space combinations of library experts found by gradient-free search:
DFWE (Ninalga 2023) and LoraHub (Huang et al. 2023).

Letters: E experts, D site input, F site output, R LoRA rank, B batch, T target length.

Both methods look for one weight per expert, score each candidate by the loss of the combined
model on a few labelled target examples, and search with a derivative-free optimiser. The loss is a
`jax.jit`-compiled function of the weight vector ``w`` [E] (an array input), so every candidate
reuses one compilation: the combined LoRA factors are built inside the compiled function from the
stacked experts (`combined_adapters`) and fed to a plain single-LoRA model (adapter mode 'lora',
scale 1; each expert's own scale is folded into its ``lora_a``).

DFWE ("Derivative Free Weight-space Ensembling", Ninalga, arXiv 2307.03506, 2023):
  1. fine-tune every source expert on the few-shot target data (`finetune_stacked`: Adam on the
     expert's LoRA factors, base frozen);
  2. linearly interpolate the fine-tuned models' WEIGHTS, ``theta = sum_e w_e theta_e`` with the
     interpolation weights on the simplex; for LoRA experts over one base this is
     ``W + sum_e w_e s_e A_e B_e`` exactly (``combine='delta'``: the factors are concatenated
     along the rank, ``[w_1 s_1 A_1 | ...] [B_1; ...]``);
  3. choose ``w`` by gradient-free optimisation of the few-shot loss. The public text of the
     paper we could read specifies neither the optimiser's settings nor the parametrisation; we use
     CMA-ES (``cma`` package) on ``x`` in [0, 1]^E with ``w = x / sum(x)`` (non-negative, sums to 1;
     uniform if ``sum(x) = 0``), starting from the uniform interpolation, with a configurable
     evaluation budget. These choices are ours and documented as such.

LoraHub (Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition"; official code sail-sg/lorahub ``lorahub/algorithm.py``):
  * composition at the FACTOR level (``combine='factor'``): ``A = sum_e w_e A_e``,
    ``B = sum_e w_e B_e`` (``get_score`` sums the PEFT state dicts weighted by ``w``);
  * ``w`` in [-1.5, 1.5]^E, initialised at 0, budget 40 evaluations (``max_inference_step``);
  * objective = few-shot loss + ``0.05 * mean_e |w_e|`` (``default_l1_regularization``);
  * the official loss (``default_get_loss``) sums the batch-mean token cross entropies and divides
    by the NUMBER OF EXAMPLES (``loss_reduction='per_example'``, the default here);
    ``'mean'`` is the plain token mean;
  * the official optimiser is nevergrad's ``NGOpt``; we use CMA-ES with the same box bounds (the
    ``cma`` package's bound transform keeps every candidate feasible), which the task allows. The
    first evaluation is always the initial point (``w = 0`` for LoraHub, uniform for DFWE) and we
    return the best evaluated candidate, never more than ``budget`` evaluations.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import cma
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from phatgoose_jax import adapters as ad
from phatgoose_jax.library import to_adapters_tree
from phatgoose_jax.models.config import T5Config
from phatgoose_jax.models.scoring import cross_entropy_loss

Array = jax.Array
Stacked = Mapping[str, Mapping[str, Any]]
COMBINES = ("delta", "factor")
LOSS_REDUCTIONS = ("per_example", "mean")
_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


class CombinationError(ValueError):
  """Bad arguments to DFWE / LoraHub."""


@gin.configurable(module="phatgoose_jax.methods.dfwe")
@dataclasses.dataclass(frozen=True)
class DFWEConfig:
  """Attributes:
    finetune_steps: Adam steps fine-tuning each expert on the few-shot data (step 1).
    finetune_learning_rate: its learning rate.
    budget: loss evaluations of the search (step 3).
    sigma0: CMA-ES initial step size in x-space ([0, 1]^E).
    popsize: CMA-ES population (None: cma's default 4 + 3 ln E).
    seed: CMA-ES seed (>= 1; cma treats 0 as "from the clock").
    loss_reduction: see module docstring.
  """
  finetune_steps: int = 50
  finetune_learning_rate: float = 1e-3
  budget: int = 100
  sigma0: float = 0.3
  popsize: Optional[int] = None
  seed: int = 1
  loss_reduction: str = "mean"


@gin.configurable(module="phatgoose_jax.methods.dfwe")
@dataclasses.dataclass(frozen=True)
class LoraHubConfig:
  """Attributes (official values as defaults):
    budget: loss evaluations (``max_inference_step`` = 40).
    bound: weights in [-bound, bound] (1.5).
    l1_weight: coefficient of ``mean |w|`` (0.05).
    sigma0: CMA-ES initial step size.
    popsize: CMA-ES population (None: cma's default).
    seed: CMA-ES seed (official seed 42).
    loss_reduction: 'per_example' (official) or 'mean'.
  """
  budget: int = 40
  bound: float = 1.5
  l1_weight: float = 0.05
  sigma0: float = 0.5
  popsize: Optional[int] = None
  seed: int = 42
  loss_reduction: str = "per_example"


@dataclasses.dataclass
class SearchResult:
  """Attributes:
    weights: [E] best combination weights found (after the method's transform).
    x: [E] the optimiser's coordinates of that candidate.
    objective: its objective value (loss + penalty).
    loss: its few-shot loss.
    history: per evaluation (x, weights, objective), in order.
    adapters: the combined single-LoRA ``adapters`` tree (mode 'lora', scale 1).
    rank: its rank.
    stacked: the stacked experts used (fine-tuned ones for DFWE).
  """
  weights: np.ndarray
  x: np.ndarray
  objective: float
  loss: float
  history: List[Tuple[np.ndarray, np.ndarray, float]]
  adapters: Dict[str, Any]
  rank: int
  stacked: Dict[str, Dict[str, Any]]

  @property
  def num_evaluations(self) -> int:
    return len(self.history)


# ----------------------------------------------------------------------------------------------
# Combined LoRA and the compiled few-shot loss.
# ----------------------------------------------------------------------------------------------


def _check_stacked(stacked: Stacked) -> int:
  if not stacked:
    raise CombinationError("stacked: no sites")
  num = None
  for site, entry in stacked.items():
    for key in ("lora_a", "lora_b", "scale"):
      if key not in entry:
        raise CombinationError(f"stacked[{site!r}] lacks {key!r}")
    a, b, s = (np.shape(entry[k]) for k in ("lora_a", "lora_b", "scale"))
    if len(a) != 3 or len(b) != 3 or a[0] != b[0] or a[2] != b[1] or s != (a[0],):
      raise CombinationError(f"stacked[{site!r}]: need lora_a [E, D, R], lora_b [E, R, F], "
                             f"scale [E]; got {a}, {b}, {s}")
    if num is not None and a[0] != num:
      raise CombinationError(f"stacked[{site!r}] has {a[0]} experts, other sites {num}")
    num = a[0]
  return int(num)


def combined_rank(stacked: Stacked, combine: str) -> int:
  """Rank of the combined LoRA: E*R for 'delta', R for 'factor'."""
  num = _check_stacked(stacked)
  r = int(np.shape(next(iter(stacked.values()))["lora_a"])[2])
  return num * r if combine == "delta" else r


def combined_site(lora_a: Array, lora_b: Array, scale: Array, w: Array,
                  combine: str) -> Tuple[Array, Array]:
  """One site's combined factors (scale folded in, so the combined scale is 1).

  Args:
    lora_a: [E, D, R]; lora_b: [E, R, F]; scale: [E]; w: [E].
    combine: 'delta' -> (``[D, E*R]``, ``[E*R, F]``) with ``a @ b = sum_e w_e s_e A_e B_e``;
      'factor' -> (``sum_e w_e s_e A_e`` [D, R], ``sum_e w_e B_e`` [R, F]) (LoraHub).
  """
  w = jnp.asarray(w, jnp.float32)
  a = jnp.asarray(lora_a, jnp.float32) * (w * jnp.asarray(scale, jnp.float32))[:, None, None]
  b = jnp.asarray(lora_b, jnp.float32)
  if combine == "delta":
    e, d, r = a.shape
    return jnp.transpose(a, (1, 0, 2)).reshape(d, e * r), b.reshape(e * r, b.shape[2])
  if combine == "factor":
    return jnp.sum(a, axis=0), jnp.einsum("e,erf->rf", w, b)
  raise CombinationError(f"combine must be one of {COMBINES}, got {combine!r}")


def combined_adapters(stacked: Stacked, w: Array, combine: str) -> Dict[str, Any]:
  """The nested ``adapters`` tree of the combined single LoRA (traceable in ``w``)."""
  flat = {}
  for site, entry in stacked.items():
    a, b = combined_site(entry["lora_a"], entry["lora_b"], entry["scale"], w, combine)
    flat[site] = {"lora_a": a, "lora_b": b}
  return to_adapters_tree(flat)


def single_lora_model(t5_config: T5Config, sites: Sequence[str], rank: int,
                      scale: Optional[float] = 1.0) -> Any:
  """The base model with one LoRA of ``rank`` at exactly ``sites``."""
  pattern = "|".join(re.escape(s) for s in sites)
  return ad.build_model(t5_config, ad.AdapterConfig(mode="lora", site_pattern=pattern,
                                                    rank=int(rank), scale=scale))


def _as_batches(batches: Any) -> List[Dict[str, np.ndarray]]:
  batches = [batches] if isinstance(batches, Mapping) else list(batches)
  if not batches:
    raise CombinationError("few-shot batches: none given")
  out = []
  for i, b in enumerate(batches):
    missing = [k for k in _FEATURES if k not in b]
    if missing:
      raise CombinationError(f"few-shot batch {i} lacks features {missing}")
    tgt = np.asarray(b["decoder_target_tokens"], np.int32)
    weights = b.get("decoder_loss_weights")
    out.append({"encoder_input_tokens": np.asarray(b["encoder_input_tokens"], np.int32),
                "decoder_input_tokens": np.asarray(b["decoder_input_tokens"], np.int32),
                "decoder_target_tokens": tgt,
                "decoder_loss_weights": np.asarray(tgt > 0 if weights is None else weights,
                                                   np.float32)})
  return out


@functools.lru_cache(maxsize=16)
def _combined_batch_loss(model: Any, combine: str) -> Callable:
  """``loss(params, stacked, w, batch)`` of the combined model, one jitted function per (model,
  combine): base params, the stacked experts, the weights and the batch are inputs, so new
  candidates, new few-shot tasks and new expert values reuse its compilation."""

  @jax.jit
  def batch_loss(params, stacked_j, w, batch):
    adapters = combined_adapters(stacked_j, w, combine)
    logits = model.apply({"params": params, "adapters": adapters}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                         enable_dropout=False)
    loss, _ = cross_entropy_loss(logits, batch["decoder_target_tokens"],
                                 batch["decoder_loss_weights"])
    return loss

  return batch_loss


@functools.lru_cache(maxsize=16)
def _finetune_step(model: Any, learning_rate: float) -> Tuple[Any, Callable]:
  """(Adam, jitted step) of `finetune_stacked` for one single-LoRA model (its scale included)."""
  opt = optax.adam(learning_rate)

  def loss_of(adapters, params, batch):
    logits = model.apply({"params": params, "adapters": adapters},
                         batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                         batch["decoder_target_tokens"], enable_dropout=False)
    return cross_entropy_loss(logits, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"])[0]

  @jax.jit
  def train_step(adapters, opt_state, params, batch):
    grads = jax.grad(loss_of)(adapters, params, batch)
    updates, opt_state = opt.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  return opt, train_step


def make_loss_fn(t5_config: T5Config, params: Any, stacked: Stacked, batches: Any,
                 combine: str, loss_reduction: str = "mean") -> Callable[[np.ndarray], float]:
  """``loss(w [E]) -> float``: few-shot loss of the combined model, compiled once.

  Args:
    t5_config, params: the base model.
    stacked: ``{site: {'lora_a' [E, D, R], 'lora_b' [E, R, F], 'scale' [E]}}``.
    batches: one feature dict or a list of them (teacher-forced, t5x layout).
    combine: 'delta' (DFWE) or 'factor' (LoraHub).
    loss_reduction: 'mean' = token-mean cross entropy of each batch averaged over batches;
      'per_example' = the sum of batch token means divided by the number of examples (LoraHub).
  """
  if loss_reduction not in LOSS_REDUCTIONS:
    raise CombinationError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got "
                           f"{loss_reduction!r}")
  if combine not in COMBINES:
    raise CombinationError(f"combine must be one of {COMBINES}, got {combine!r}")
  num = _check_stacked(stacked)
  batches = _as_batches(batches)
  model = single_lora_model(t5_config, list(stacked), combined_rank(stacked, combine))
  stacked_j = {s: {k: jnp.asarray(v) for k, v in e.items()} for s, e in stacked.items()}
  shared_loss = _combined_batch_loss(model, combine)

  def batch_loss(w, batch):
    return shared_loss(params, stacked_j, w, batch)

  num_examples = sum(b["encoder_input_tokens"].shape[0] for b in batches)

  def loss_fn(w: np.ndarray) -> float:
    w = np.asarray(w, np.float32)
    if w.shape != (num,):
      raise CombinationError(f"loss_fn: w must be [E={num}], got {w.shape}")
    total = sum(float(batch_loss(w, b)) for b in batches)
    return total / (num_examples if loss_reduction == "per_example" else len(batches))

  loss_fn.batch_loss = shared_loss  # exposed for tests (one compilation)
  return loss_fn


# ----------------------------------------------------------------------------------------------
# Derivative-free search (CMA-ES with box bounds).
# ----------------------------------------------------------------------------------------------


def cma_search(objective: Callable[[np.ndarray], float], x0: np.ndarray, lower: float,
               upper: float, budget: int, sigma0: float, seed: int,
               popsize: Optional[int] = None) -> Tuple[np.ndarray, float, List]:
  """Minimises ``objective`` over the box [lower, upper]^n with at most ``budget`` evaluations.

  The first evaluation is ``x0``; CMA-ES (``cma``, bound transform) proposes the rest; an
  incomplete last generation is evaluated but not told to the optimiser.

  Returns:
    (best x, best value, [(x, value) per evaluation]).
  """
  if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
    raise CombinationError(f"budget must be a positive int, got {budget!r}")
  if not upper > lower:
    raise CombinationError(f"bounds must satisfy lower < upper, got [{lower}, {upper}]")
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 1:
    raise CombinationError(f"seed must be an int >= 1 (cma treats 0 as the clock), got {seed!r}")
  if not sigma0 > 0:
    raise CombinationError(f"sigma0 must be > 0, got {sigma0!r}")
  x0 = np.clip(np.asarray(x0, np.float64), lower, upper)
  history = [(x0.copy(), float(objective(x0)))]
  n = x0.size
  opts = {"bounds": [[lower] * n, [upper] * n], "seed": seed, "verbose": -9}
  if popsize is not None:
    if isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < 2:
      raise CombinationError(f"popsize must be None or an int >= 2, got {popsize!r}")
    opts["popsize"] = popsize
  es = cma.CMAEvolutionStrategy(x0.tolist(), float(sigma0), opts)
  while len(history) < budget:
    xs = es.ask()
    values = []
    for x in xs:
      if len(history) >= budget:
        break
      x = np.clip(np.asarray(x, np.float64), lower, upper)
      values.append(float(objective(x)))
      history.append((x, values[-1]))
    if len(values) == len(xs):
      es.tell(xs, values)
  best = min(range(len(history)), key=lambda i: history[i][1])
  return history[best][0], history[best][1], history


def simplex_weights(x: np.ndarray) -> np.ndarray:
  """DFWE weights ``x / sum(x)`` for x >= 0 (uniform when the sum is 0)."""
  x = np.clip(np.asarray(x, np.float64), 0.0, None)
  total = x.sum()
  if total <= 1e-12:
    return np.full(x.shape, 1.0 / x.size)
  return x / total


def l1_penalty(w: np.ndarray, l1_weight: float) -> float:
  """LoraHub's ``default_l1_regularization``: ``l1_weight * mean_e |w_e|``."""
  if not l1_weight >= 0:
    raise CombinationError(f"l1_weight must be >= 0, got {l1_weight!r}")
  w = np.asarray(w, np.float64)
  return float(l1_weight * np.abs(w).sum() / w.size)


# ----------------------------------------------------------------------------------------------
# DFWE step 1: fine-tune each expert on the few-shot data.
# ----------------------------------------------------------------------------------------------


def finetune_stacked(t5_config: T5Config, params: Any, stacked: Stacked, batches: Any,
                     steps: int, learning_rate: float) -> Dict[str, Dict[str, np.ndarray]]:
  """Fine-tunes every expert's LoRA factors (base frozen) on ``batches`` with Adam.

  Each expert trains separately (its own scale, token-mean cross entropy, batches cycled).

  Returns:
    A stacked dict like ``stacked`` with the fine-tuned ``lora_a`` / ``lora_b``.
  """
  num = _check_stacked(stacked)
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise CombinationError(f"finetune steps must be an int >= 0, got {steps!r}")
  out = {s: {k: np.array(v) for k, v in e.items()} for s, e in stacked.items()}
  if steps == 0:
    return out
  batches = _as_batches(batches)
  sites = list(stacked)
  rank = int(np.shape(stacked[sites[0]]["lora_a"])[2])
  scales = np.asarray(stacked[sites[0]]["scale"], np.float64)
  for s in sites[1:]:  # one single-LoRA model per expert: one rank and one scale at every site
    if int(np.shape(stacked[s]["lora_a"])[2]) != rank or not np.array_equal(
        np.asarray(stacked[s]["scale"], np.float64), scales):
      raise CombinationError(
          f"finetune: stacked[{s!r}] has rank {np.shape(stacked[s]['lora_a'])[2]} / scales "
          f"{np.asarray(stacked[s]['scale']).tolist()}, site {sites[0]!r} rank {rank} / scales "
          f"{scales.tolist()}; fine-tuning needs every site's rank and per-expert scale equal")
  for e in range(num):
    model = single_lora_model(t5_config, sites, rank, float(scales[e]))
    opt, train_step = _finetune_step(model, float(learning_rate))
    adapters = to_adapters_tree({s: {"lora_a": jnp.asarray(stacked[s]["lora_a"][e], jnp.float32),
                                     "lora_b": jnp.asarray(stacked[s]["lora_b"][e], jnp.float32)}
                                 for s in sites})
    opt_state = opt.init(adapters)
    for i in range(steps):
      adapters, opt_state = train_step(adapters, opt_state, params, batches[i % len(batches)])
    for s in sites:
      node = adapters
      for part in s.split("/"):
        node = node[part]
      out[s]["lora_a"][e] = np.asarray(node["lora_a"])
      out[s]["lora_b"][e] = np.asarray(node["lora_b"])
  return out


# ----------------------------------------------------------------------------------------------
# The two methods.
# ----------------------------------------------------------------------------------------------


def dfwe(t5_config: T5Config, params: Any, stacked: Stacked, batches: Any,
         config: DFWEConfig = DFWEConfig()) -> SearchResult:
  """DFWE: fine-tune each expert on the few-shot data, then CMA-ES over simplex interpolation
  weights of the fine-tuned experts' weights (``combine='delta'``). See module docstring."""
  num = _check_stacked(stacked)
  tuned = finetune_stacked(t5_config, params, stacked, batches, config.finetune_steps,
                           config.finetune_learning_rate)
  loss_fn = make_loss_fn(t5_config, params, tuned, batches, "delta", config.loss_reduction)
  record: List = []

  def objective(x):
    w = simplex_weights(x)
    value = loss_fn(w)
    record.append((np.asarray(x), w, value))
    return value

  x, value, _ = cma_search(objective, np.full(num, 0.5), 0.0, 1.0, config.budget, config.sigma0,
                           config.seed, config.popsize)
  w = simplex_weights(x)
  return SearchResult(weights=w, x=x, objective=value, loss=value, history=record,
                      adapters=combined_adapters(tuned, w, "delta"),
                      rank=combined_rank(tuned, "delta"), stacked=tuned)


def lorahub(t5_config: T5Config, params: Any, stacked: Stacked, batches: Any,
            config: LoraHubConfig = LoraHubConfig()) -> SearchResult:
  """LoraHub: CMA-ES over w in [-bound, bound]^E (init 0) of loss(factor combination) +
  l1_weight * mean|w|, at most ``budget`` evaluations. See module docstring."""
  num = _check_stacked(stacked)
  if not (isinstance(config.bound, (int, float)) and config.bound > 0):
    raise CombinationError(f"LoraHubConfig.bound must be > 0, got {config.bound!r}")
  loss_fn = make_loss_fn(t5_config, params, stacked, batches, "factor", config.loss_reduction)
  record: List = []
  losses: Dict[int, float] = {}

  def objective(x):
    loss = loss_fn(x)
    value = loss + l1_penalty(x, config.l1_weight)
    losses[len(record)] = loss
    record.append((np.asarray(x), np.asarray(x), value))
    return value

  x, value, hist = cma_search(objective, np.zeros(num), -float(config.bound), float(config.bound),
                              config.budget, config.sigma0, config.seed, config.popsize)
  best = min(range(len(hist)), key=lambda i: hist[i][1])
  return SearchResult(weights=np.asarray(x), x=np.asarray(x), objective=value, loss=losses[best],
                      history=record, adapters=combined_adapters(stacked, x, "factor"),
                      rank=combined_rank(stacked, "factor"),
                      stacked={s: dict(e) for s, e in stacked.items()})


__all__ = [
    "COMBINES", "CombinationError", "DFWEConfig", "LoraHubConfig", "SearchResult", "cma_search",
    "combined_adapters", "combined_rank", "combined_site", "dfwe", "finetune_stacked",
    "l1_penalty", "lorahub", "make_loss_fn", "simplex_weights", "single_lora_model",
]
