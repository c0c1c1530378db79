"""Reference baselines that pick or merge experts without routing: Oracle, Best-individual and
Merged Experts (PHATGOOSE, Muqeeth et al., ICML 2024, sec. 5.1 and Table 1).

Letters: E experts, H held-out tasks, D site input, F site output, R LoRA rank.

* Oracle: for every held-out task, the expert with the best score ON THAT TASK (an upper bound of
  any per-task single-expert choice; it peeks at the test labels).
* Best individual: the ONE expert with the best score averaged over the held-out tasks (unweighted
  mean over tasks, the paper's aggregation), used for every task.
Both read a table ``scores[expert][task]`` (higher is better, e.g. accuracy); ties go to the first
expert in table order. Missing entries are refused.

* Merged Experts: all experts merged into one LoRA with `phatgoose_jax.merging.merge_library`
  (``'uniform_factor'``: the official ``average_lora_weights``, A and B averaged separately;
  ``'delta_average'``: the exact mean of the updates; or any PEFT method, e.g. ``'ties'`` with a
  density), evaluated as a plain single-LoRA model (`merged_adapters`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import gin
import numpy as np

from phatgoose_jax import adapters as ad
from phatgoose_jax import merging
from phatgoose_jax.library import ExpertLibrary, to_adapters_tree

ScoreTable = Mapping[str, Mapping[str, float]]


class OracleError(ValueError):
  """Bad score table or merge arguments."""


def _tasks_of(scores: ScoreTable, tasks: Optional[Sequence[str]]) -> List[str]:
  if not scores:
    raise OracleError("scores: the table has no experts")
  if tasks is None:
    tasks = sorted({t for row in scores.values() for t in row})
  tasks = list(tasks)
  if not tasks:
    raise OracleError("scores: no held-out tasks")
  for expert, row in scores.items():
    missing = [t for t in tasks if t not in row]
    if missing:
      raise OracleError(f"scores[{expert!r}] has no score for task(s) {missing}")
    bad = [t for t in tasks if not math.isfinite(float(row[t]))]
    if bad:
      raise OracleError(f"scores[{expert!r}] is not finite for task(s) {bad}")
  return tasks


@dataclasses.dataclass(frozen=True)
class OracleResult:
  """Attributes:
    experts: task -> chosen expert.
    scores: task -> its score.
    average: unweighted mean over tasks.
  """
  experts: Dict[str, str]
  scores: Dict[str, float]
  average: float


def oracle(scores: ScoreTable, tasks: Optional[Sequence[str]] = None) -> OracleResult:
  """Per held-out task, the best expert on that task."""
  tasks = _tasks_of(scores, tasks)
  names = list(scores)
  chosen, best = {}, {}
  for t in tasks:
    values = [float(scores[n][t]) for n in names]
    i = int(np.argmax(values))  # first on ties
    chosen[t], best[t] = names[i], values[i]
  return OracleResult(chosen, best, float(np.mean([best[t] for t in tasks])))


@dataclasses.dataclass(frozen=True)
class BestIndividualResult:
  """Attributes:
    expert: the chosen expert.
    scores: task -> its score.
    average: its mean over tasks.
    averages: expert -> mean over tasks (all experts).
  """
  expert: str
  scores: Dict[str, float]
  average: float
  averages: Dict[str, float]


def best_individual(scores: ScoreTable, tasks: Optional[Sequence[str]] = None
                    ) -> BestIndividualResult:
  """The single expert with the best unweighted mean score over the held-out tasks."""
  tasks = _tasks_of(scores, tasks)
  names = list(scores)
  averages = {n: float(np.mean([float(scores[n][t]) for t in tasks])) for n in names}
  i = int(np.argmax([averages[n] for n in names]))
  name = names[i]
  return BestIndividualResult(name, {t: float(scores[name][t]) for t in tasks}, averages[name],
                              averages)


def score_table(matrix: Any, experts: Sequence[str], tasks: Sequence[str]) -> Dict[str, Dict]:
  """``[E, H]`` array -> ``{expert: {task: score}}``."""
  m = np.asarray(matrix, np.float64)
  if m.shape != (len(experts), len(tasks)):
    raise OracleError(f"score_table: matrix shape {m.shape} != (E={len(experts)}, "
                      f"H={len(tasks)})")
  return {e: {t: float(m[i, j]) for j, t in enumerate(tasks)} for i, e in enumerate(experts)}


# ----------------------------------------------------------------------------------------------
# Merged Experts.
# ----------------------------------------------------------------------------------------------


@gin.configurable(module="phatgoose_jax.methods.oracle")
@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """Attributes:
    method: a `phatgoose_jax.merging.METHODS` name ('uniform_factor', 'delta_average', 'ties', ...).
    density: for ties / dare_* / magnitude_prune (None otherwise).
    majority_sign_method: 'total' or 'frequency' (ties).
    weights: per-expert merge weights (None: uniform; required as ones by the PEFT methods).
  """
  method: str = "uniform_factor"
  density: Optional[float] = None
  majority_sign_method: str = "total"
  weights: Optional[Tuple[float, ...]] = None

  def __post_init__(self):
    if self.method not in merging.METHODS:
      raise OracleError(f"MergeConfig.method must be one of {merging.METHODS}, got "
                        f"{self.method!r}")


def merged_adapters(stacked: Mapping[str, Mapping[str, Any]],
                    config: MergeConfig = MergeConfig(), rng: Any = None
                    ) -> Tuple[Dict[str, Any], ad.AdapterConfig]:
  """Merges a stacked library into one LoRA.

  Args:
    stacked: ``ExpertLibrary.stack(...)`` output (``lora_a`` [E, D, R], ``lora_b`` [E, R, F],
      ``scale`` [E] per site).
    config: `MergeConfig`.
    rng: PRNGKey for the dare_* methods.

  Returns:
    (nested ``adapters`` tree, `AdapterConfig` of the single-LoRA model: mode 'lora', the merged
    rank, scale 1 (each site's merged scale is folded into its ``lora_a``), pattern = the sites).
  """
  if not stacked:
    raise OracleError("merged_adapters: stacked has no sites")
  site = next(iter(stacked))
  num = int(np.shape(stacked[site]["lora_a"])[0])
  scales = {s: np.asarray(e["scale"], np.float64) for s, e in stacked.items()}
  weights = None if config.weights is None else np.asarray(config.weights, np.float64)
  if weights is None and config.method not in ("uniform_factor", "delta_average"):
    weights = np.ones((num,))
  if weights is not None and weights.shape != (num,):
    raise OracleError(f"MergeConfig.weights must have E={num} entries, got {weights.shape}")
  kw = dict(density=config.density)
  if config.method in ("ties", "dare_ties", "ties_svd", "dare_ties_svd"):
    kw["majority_sign_method"] = config.majority_sign_method
  merged = merging.merge_library({s: {"lora_a": e["lora_a"], "lora_b": e["lora_b"]}
                                  for s, e in stacked.items()}, scales, weights, config.method,
                                 rng=rng, **kw)
  ranks = {int(np.shape(m["lora_a"])[1]) for m in merged.values()}
  if len(ranks) != 1:
    raise OracleError(f"merged_adapters: merged ranks differ across sites: {sorted(ranks)}")
  flat = {s: {"lora_a": np.asarray(m["lora_a"]) * float(m["scale"]),
              "lora_b": np.asarray(m["lora_b"])} for s, m in merged.items()}
  pattern = "|".join(re.escape(s) for s in stacked)
  cfg = ad.AdapterConfig(mode="lora", site_pattern=pattern, rank=ranks.pop(), scale=1.0)
  return to_adapters_tree(flat), cfg


def merged_library_adapters(library: ExpertLibrary, names: Optional[Sequence[str]] = None,
                            config: MergeConfig = MergeConfig(), rng: Any = None
                            ) -> Tuple[Dict[str, Any], ad.AdapterConfig]:
  """`merged_adapters` of ``library.stack(names, vectors=None)``."""
  return merged_adapters(library.stack(names, vectors=None), config, rng)


__all__ = [
    "BestIndividualResult", "MergeConfig", "OracleError", "OracleResult", "best_individual",
    "merged_adapters", "merged_library_adapters", "oracle", "score_table",
]
