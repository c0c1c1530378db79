"""Merging many LoRA experts at one site into a single LoRA.

Letters: E experts, D site input, F site output, R LoRA rank (R' merged rank).

Convention (the whole package): expert e at a site is `a [D, R]`, `b [R, F]`
with a scalar LoRA scale `s_e` (alpha / r), and acts as `x @ (s_e * a @ b)`, so
its update is `dW_e = s_e * a_e @ b_e` in `[D, F]`. HF PEFT stores the
transposes, `lora_A [R, D]`, `lora_B [F, R]`, `dW = scaling * B @ A` in
`[F, D]`; every element-wise operation below commutes with that transpose, so
the factors returned here are exactly PEFT's factors transposed
(`a = lora_A.T`, `b = lora_B.T`).

Methods (`merge_loras(..., method=...)`). The PEFT ones reproduce
`LoraModel.add_weighted_adapter` of HF PEFT 0.21.2 (peft/tuners/lora/model.py,
peft/utils/merge_utils.py), quirks included; tests compare against numbers
PEFT itself produced (tests/testdata/peft_merging). Every PEFT method returns
`scale = 1.0`: PEFT gives the merged adapter `r = lora_alpha = R'`, so its
scaling is 1 (PEFT quirk: with `use_rslora=True` in the source config it would
be `sqrt(R')` instead, which rescales the merged update; not reproduced).

* `linear` (PEFT, factor level; equal ranks): with `c_e = w_e * s_e`,
  `a = sum_e sign(c_e) sqrt(|c_e|) a_e`, `b = sum_e sqrt(|c_e|) b_e`
  (the sign rides on `a` only). `a @ b` contains the cross terms
  `a_i @ b_j` (i != j): it is NOT the weighted sum of the updates.
* `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (PEFT, factor level;
  equal ranks): PEFT applies the task-arithmetic merge to the stack of `a_e`
  with weights `sign(c_e) sqrt(|c_e|)` and, separately, to the stack of `b_e`
  with weights `sqrt(|c_e|)`:
    - `magnitude_prune`: keep the `int(density * numel)` largest-|x| entries
      of each expert's tensor, then weighted sum.
    - `ties`: magnitude-prune each expert, elect a sign per entry from the
      *unweighted* pruned stack (`total`: sign of the sum, ties to +;
      `frequency`: sign of the sum of signs), weight, keep the entries whose
      sign agrees with the elected one (zeros never agree) and divide their
      sum by their count (at least 1). So ties is a disjoint *mean*, not sum.
    - `dare_linear`: random Bernoulli(density) mask, rescale by 1/density
      (expected value preserved), weighted sum. `dare_ties`: same pruning,
      then ties' sign election and disjoint mean. Masks come from `rng`
      (jax PRNGKey) and cannot equal PEFT's torch masks; at density 1 PEFT
      (and this code) skip pruning, so those results are deterministic.
    A `density >= 1` disables pruning (PEFT: with a warning).
* `cat` (PEFT; any ranks): `a = concat_e(w_e s_e a_e)`, `b = concat_e(b_e)`
  along the rank, R' = sum R_e; `a @ b = sum_e w_e dW_e` exactly.
* `svd` and `ties_svd`, `dare_linear_svd`, `dare_ties_svd`,
  `magnitude_prune_svd` (PEFT; any ranks): `svd` takes the weighted sum
  `sum_e w_e dW_e`; the others apply the merges above to the full updates
  `dW_e` (scale included) with the plain weights `w_e`. Then a
  truncated SVD of the result in PEFT's `[F, D]` orientation,
  `U S Vh`: PEFT's `lora_B = U[:, :R'] diag(S[:R'])`, `lora_A = Vh[:R']`,
  i.e. here `b = (U S)^T`, `a = Vh^T`. R' = `svd_rank` or the largest R_e.
  `svd_clamp = q` clamps both factors to `[-t, t]`, `t` = the q-quantile of
  all their entries together (linear interpolation). `svd_full_matrices`
  only matters when R' > min(D, F): reduced SVD gives rank min(D, F); full
  SVD gives PEFT's mismatched factors, refused here unless D == F. PEFT's
  `svd_driver` (CUDA only) has no counterpart.
* One expert: PEFT switches every method to `linear`; so does this code for
  the PEFT methods (same update, factors split `sqrt(|w s|)` each way).

Non-PEFT methods:

* `uniform_factor`: the "Merged Experts" baseline of the PHATGOOSE paper
  (Muqeeth et al., ICML 2024, baselines). The official code (r-three/phatgoose,
  scripts/manipulations.py, `average_lora_weights`) averages the A factors
  and the B factors of the experts separately with uniform weights:
  `a = mean_e a_e`, `b = mean_e b_e` (equal ranks). The official LoRAs share
  one scale; if the scales here differ, each `s_e` is folded into `a_e`
  before averaging and the returned scale is 1. `weights` must be None or
  all equal. (The repository's later README builds the released Merged
  Experts checkpoint with `average_outer_product_lora_weights`, whose body is
  not in the code we could read; by its name and output folder
  ("..._outerproduct") it averages the updates `a_e @ b_e`, which is
  `delta_average` with uniform weights. Both are provided; which one the
  paper's numbers used is not settled by the public code.)
* `delta_average`: the exact weighted average of the updates,
  `sum_e w_e dW_e / sum_e w_e` (uniform when `weights` is None), in factor
  form: `a = concat_e(w_e s_e a_e / sum w)`, `b = concat_e(b_e)`, scale 1.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PEFT_FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PEFT_SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
PEFT_METHODS = PEFT_FACTOR_METHODS + ("cat",) + PEFT_SVD_METHODS
METHODS = PEFT_METHODS + ("uniform_factor", "delta_average")
_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_METHODS = ("total", "frequency")


class MergeError(ValueError):
  """Invalid arguments to a LoRA merge."""


# ----------------------------------------------------------------------------
# Task-arithmetic building blocks on stacked tensors [E, ...].
# ----------------------------------------------------------------------------


def _bcast(weights: Array, tensors: Array) -> Array:
  """Reshapes per-expert weights [E] to broadcast against [E, ...]."""
  return weights.reshape(weights.shape + (1,) * (tensors.ndim - 1))


def magnitude_prune_each(tensors: Array, density: float) -> Array:
  """Keeps each expert's `int(density * numel)` largest-magnitude entries.

  Args:
    tensors: [E, ...] one tensor per expert.
    density: fraction kept; >= 1 returns `tensors` unchanged.

  Returns:
    [E, ...] with the other entries zeroed.
  """
  if density >= 1:
    return tensors
  flat = tensors.reshape(tensors.shape[0], -1)  # [E, N]
  k = int(density * flat.shape[1])
  if k == 0:
    return jnp.zeros_like(tensors)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)  # [E, k]
  mask = jnp.zeros_like(flat).at[jnp.arange(flat.shape[0])[:, None], idx].set(1.0)
  return (flat * mask).reshape(tensors.shape)


def random_prune_each(tensors: Array, density: float, rng: Array) -> Array:
  """DARE: keeps each entry with probability `density`, rescales by 1/density.

  Args:
    tensors: [E, ...].
    density: keep probability in (0, 1]; >= 1 returns `tensors` unchanged.
    rng: jax PRNGKey.

  Returns:
    [E, ...] whose expectation over `rng` equals `tensors`.
  """
  if density >= 1:
    return tensors
  keep = jax.random.bernoulli(rng, density, tensors.shape)
  return jnp.where(keep, tensors, 0.0) / density


def majority_sign_mask(tensors: Array, method: str = "total") -> Array:
  """[E, ...] bool: entries whose sign equals the elected sign (ties: +)."""
  signs = jnp.sign(tensors)
  if method == "total":
    magnitude = tensors.sum(axis=0)
  elif method == "frequency":
    magnitude = signs.sum(axis=0)
  else:
    raise MergeError(f"majority_sign_method must be one of {_SIGN_METHODS}, got {method!r}")
  elected = jnp.where(magnitude >= 0, 1.0, -1.0)
  return signs == elected[None]


def disjoint_mean(weighted: Array, mask: Array) -> Array:
  """Mean over experts of the kept entries ([E, ...] -> [...])."""
  total = jnp.where(mask, weighted, 0.0).sum(axis=0)
  count = mask.sum(axis=0).astype(weighted.dtype)
  return total / jnp.maximum(count, 1.0)


def combine(tensors: Array, weights: Array, kind: str, density: float | None,
            majority_sign_method: str, rng: Array | None) -> Array:
  """One of PEFT's task-arithmetic merges of a stack of tensors.

  Args:
    tensors: [E, ...] one tensor per expert.
    weights: [E] merge weights (applied after pruning and sign election).
    kind: 'linear' | 'ties' | 'dare_linear' | 'dare_ties' | 'magnitude_prune'.
    density: pruning density (ignored by 'linear').
    majority_sign_method: 'total' | 'frequency' (ties kinds only).
    rng: PRNGKey for the dare kinds when density < 1.

  Returns:
    [...] the merged tensor.
  """
  if kind in ("ties", "magnitude_prune"):
    tensors = magnitude_prune_each(tensors, density)
  elif kind in ("dare_linear", "dare_ties"):
    tensors = random_prune_each(tensors, density, rng)
  weighted = tensors * _bcast(weights, tensors)
  if kind in ("ties", "dare_ties"):
    return disjoint_mean(weighted, majority_sign_mask(tensors, majority_sign_method))
  return weighted.sum(axis=0)


_STATIC = ("kind", "density", "majority_sign_method")
_combine_jit = jax.jit(combine, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC + ("rank", "clamp", "full_matrices"))
def _svd_merge(a_list: list[Array], b_list: list[Array], coef: Array, weights: Array,
               rng: Array | None, *, kind: str, density: float | None,
               majority_sign_method: str, rank: int, clamp: float | None,
               full_matrices: bool) -> tuple[Array, Array]:
  """The svd family: merge the updates dW_e, then PEFT's truncated SVD.

  Args:
    a_list: E arrays [D, R_e].
    b_list: E arrays [R_e, F].
    coef: [E] LoRA scales s_e (kind 'linear': w_e * s_e, see below).
    weights: [E] merge weights w_e (unused for kind 'linear').
    rng: PRNGKey or None (dare kinds).
    kind, density, majority_sign_method: as in `combine`.
    rank, clamp, full_matrices: as `svd_rank`, `svd_clamp`, `svd_full_matrices`.

  Returns:
    a [D, R'], b [R', F].
  """
  if kind == "linear":
    # sum_e w_e s_e a_e @ b_e without materialising E updates of [D, F].
    a_cat = jnp.concatenate([a_e * coef[e] for e, a_e in enumerate(a_list)], axis=1)
    delta = a_cat @ jnp.concatenate(b_list, axis=0)  # [D, F]
  else:
    deltas = jnp.stack([coef[e] * (a_e @ b_e) for e, (a_e, b_e) in
                        enumerate(zip(a_list, b_list))])  # [E, D, F]
    delta = combine(deltas, weights, kind, density, majority_sign_method, rng)
  return _svd_factors(delta, rank, clamp, full_matrices)


# ----------------------------------------------------------------------------
# Argument handling.
# ----------------------------------------------------------------------------


def _factor_list(name: str, value: Any) -> list[Array]:
  if isinstance(value, (list, tuple)):
    items = [jnp.asarray(v) for v in value]
  else:
    arr = jnp.asarray(value)
    if arr.ndim != 3:
      raise MergeError(f"{name} must be [E, ., .] or a list of 2-D arrays, got shape {arr.shape}")
    items = list(arr)
  if not items:
    raise MergeError(f"{name} is empty: need at least one expert")
  for i, item in enumerate(items):
    if item.ndim != 2:
      raise MergeError(f"{name}[{i}] must be 2-D, got shape {item.shape}")
  return items


def _real_or_none(name: str, value: Any) -> float | None:
  """``value`` as a Python float (None passes); bools, strings and arrays are named errors."""
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
    raise MergeError(f"{name} must be a real number or None, got {value!r}")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise MergeError(f"{name} must be a real number or None, got {value!r}") from None


def _per_expert(name: str, value: Any, num_experts: int) -> np.ndarray:
  if value is None:
    raise MergeError(f"{name} must be a scalar or one value per expert ({num_experts}), got None")
  try:
    arr = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise MergeError(f"{name} must be numbers (a scalar or one per expert), got "
                     f"{value!r}") from None
  if arr.ndim == 0:
    arr = np.full((num_experts,), float(arr))
  if arr.shape != (num_experts,):
    raise MergeError(f"{name} must be a scalar or have one value per expert ({num_experts}), "
                     f"got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise MergeError(f"{name} must be finite, got {arr.tolist()}")
  return arr


def _check_density(method: str, density: float | None) -> None:
  base = method[:-4] if method.endswith("_svd") and method != "svd" else method
  if base in _DENSITY_METHODS:
    if density is None:
      raise MergeError(f"method {method!r} needs density (fraction of entries kept)")
    low_ok = density > 0 if base.startswith("dare") else density >= 0
    if not (low_ok and density <= 1):
      bound = "(0, 1]" if base.startswith("dare") else "[0, 1]"
      raise MergeError(f"density must be in {bound} for method {method!r}, got {density}")
  elif density is not None:
    raise MergeError(f"density is not used by method {method!r}; got {density}")


def _svd_factors(delta: Array, rank: int, clamp: float | None,
                 full_matrices: bool) -> tuple[Array, Array]:
  """PEFT's split of a truncated SVD. delta [D, F] -> a [D, R'], b [R', F]."""
  u, s, vh = jnp.linalg.svd(delta.T, full_matrices=full_matrices)  # PEFT's [F, D]
  u, s, vh = u[:, :rank], s[:rank], vh[:rank, :]
  if not (u.shape[1] == s.shape[0] == vh.shape[0]):
    raise MergeError(
        f"svd_rank={rank} exceeds min(D, F)={min(delta.shape)} with svd_full_matrices=True "
        "(PEFT would build mismatched factors); lower svd_rank or pass svd_full_matrices=False")
  us = u * s[None, :]  # PEFT's lora_B, [F, R']
  if clamp is not None:
    hi = jnp.quantile(jnp.concatenate([us.ravel(), vh.ravel()]), clamp)
    us = jnp.clip(us, -hi, hi)
    vh = jnp.clip(vh, -hi, hi)
  return vh.T, us.T


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def merge_loras(lora_as: Array | Sequence[Array], lora_bs: Array | Sequence[Array],
                scales: Any, weights: Any, method: str, density: float | None = None, *,
                majority_sign_method: str = "total", svd_rank: int | None = None,
                svd_clamp: float | None = None, svd_full_matrices: bool = True,
                rng: Array | None = None) -> tuple[Array, Array, float]:
  """Merges the LoRA experts of one site into one LoRA (see module docstring).

  Args:
    lora_as: [E, D, R], or a list of E arrays [D, R_e] when ranks differ.
    lora_bs: [E, R, F], or a list of E arrays [R_e, F].
    scales: [E] (or a scalar) LoRA scale of each expert, e.g. alpha / r.
    weights: [E] (or a scalar) merge weight of each expert; may be None for
      `uniform_factor` and `delta_average` (uniform).
    method: one of `METHODS`.
    density: fraction of entries kept, for ties / dare_* / magnitude_prune
      (and their _svd variants); must be None for the other methods.
    majority_sign_method: 'total' or 'frequency' (ties / dare_ties).
    svd_rank: merged rank R' of the svd methods (default: the largest R_e).
    svd_clamp: quantile in [0, 1] for clamping the SVD factors (svd methods).
    svd_full_matrices: full or reduced SVD (svd methods).
    rng: jax PRNGKey, required by dare_* methods when density < 1.

  Returns:
    (a [D, R'], b [R', F], scale) with merged update `scale * a @ b` [D, F].
  """
  if method not in METHODS:
    raise MergeError(f"method must be one of {METHODS}, got {method!r}")
  a_list = _factor_list("lora_as", lora_as)
  b_list = _factor_list("lora_bs", lora_bs)
  num = len(a_list)
  if len(b_list) != num:
    raise MergeError(f"lora_as has {num} experts but lora_bs has {len(b_list)}")
  d, f = a_list[0].shape[0], b_list[0].shape[1]
  for i, (a, b) in enumerate(zip(a_list, b_list)):
    if a.shape[0] != d or b.shape[1] != f or a.shape[1] != b.shape[0]:
      raise MergeError(f"expert {i}: lora_as {a.shape} / lora_bs {b.shape} do not match "
                       f"a [D={d}, R] and b [R, F={f}]")
  ranks = [a.shape[1] for a in a_list]
  out_dtype = jnp.result_type(*a_list, *b_list)
  dtype = jnp.promote_types(out_dtype, jnp.float32)
  a_list = [a.astype(dtype) for a in a_list]
  b_list = [b.astype(dtype) for b in b_list]
  s = _per_expert("scales", scales, num)
  if weights is None:
    if method not in ("uniform_factor", "delta_average"):
      raise MergeError(f"weights are required for method {method!r}")
    w = np.ones((num,))
  else:
    w = _per_expert("weights", weights, num)
  if majority_sign_method not in _SIGN_METHODS:
    raise MergeError(f"majority_sign_method must be one of {_SIGN_METHODS}, "
                     f"got {majority_sign_method!r}")
  is_svd = method in PEFT_SVD_METHODS
  if not is_svd and (svd_rank is not None or svd_clamp is not None):
    raise MergeError(f"svd_rank / svd_clamp only apply to svd methods, not {method!r}")
  density = _real_or_none("density", density)  # a static jit argument: a hashable float
  svd_clamp = _real_or_none("svd_clamp", svd_clamp)
  if svd_rank is not None and (isinstance(svd_rank, (bool, np.bool_))
                               or not isinstance(svd_rank, (int, np.integer)) or svd_rank < 1):
    raise MergeError(f"svd_rank must be a positive integer, got {svd_rank!r}")
  if svd_clamp is not None and not 0 <= svd_clamp <= 1:
    raise MergeError(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp}")
  _check_density(method, density)
  if method in PEFT_METHODS and num == 1:
    method = "linear"  # PEFT's add_weighted_adapter does the same (no rng needed then).
    density = None
  if method.startswith("dare") and density < 1:
    if rng is None:
      raise MergeError(f"method {method!r} with density {density} < 1 needs rng (a PRNGKey)")
    try:
      rng = jnp.asarray(rng) if not jax.dtypes.issubdtype(getattr(rng, "dtype", None),
                                                           jax.dtypes.prng_key) else rng
      jax.random.split(rng)
    except (TypeError, ValueError):
      raise MergeError(f"rng must be a jax PRNG key (jax.random.PRNGKey / key), got "
                       f"{rng!r}") from None
  if method in PEFT_FACTOR_METHODS + ("uniform_factor",) and len(set(ranks)) != 1:
    raise MergeError(f"method {method!r} needs experts of equal rank, got ranks {ranks}")

  if method in PEFT_FACTOR_METHODS:
    c = w * s
    root = np.sqrt(np.abs(c))
    wa = jnp.asarray(np.where(c >= 0, 1.0, -1.0) * root, dtype)
    wb = jnp.asarray(root, dtype)
    rng_a, rng_b = jax.random.split(rng) if rng is not None else (None, None)
    static = dict(kind=method, density=density, majority_sign_method=majority_sign_method)
    a = _combine_jit(jnp.stack(a_list), wa, rng=rng_a, **static)
    b = _combine_jit(jnp.stack(b_list), wb, rng=rng_b, **static)
    scale = 1.0
  elif method in ("cat", "delta_average"):
    coef = w * s
    if method == "delta_average":
      total = w.sum()
      if abs(total) < 1e-12:
        raise MergeError(f"weights sum to {total}: delta_average divides by the weight sum")
      coef = coef / total
    a = jnp.concatenate([a_e * c_e for a_e, c_e in zip(a_list, coef.tolist())], axis=1)
    b = jnp.concatenate(b_list, axis=0)
    scale = 1.0
  elif method == "uniform_factor":
    if not np.allclose(w, w[0]):
      raise MergeError(f"uniform_factor averages with uniform weights; got weights {w.tolist()} "
                       "(use delta_average or linear for weighted merges)")
    if np.all(s == s[0]):
      a, scale = jnp.mean(jnp.stack(a_list), axis=0), float(s[0])
    else:
      a = jnp.mean(jnp.stack([a_e * s_e for a_e, s_e in zip(a_list, s.tolist())]), axis=0)
      scale = 1.0
    b = jnp.mean(jnp.stack(b_list), axis=0)
  else:  # svd family
    kind = "linear" if method == "svd" else method[:-4]
    coef = w * s if kind == "linear" else s
    rank = int(svd_rank) if svd_rank is not None else max(ranks)
    a, b = _svd_merge(a_list, b_list, jnp.asarray(coef, dtype), jnp.asarray(w, dtype), rng,
                      kind=kind, density=density, majority_sign_method=majority_sign_method,
                      rank=rank, clamp=svd_clamp, full_matrices=bool(svd_full_matrices))
    scale = 1.0
  return a.astype(out_dtype), b.astype(out_dtype), scale


def merge_library(stacked: Mapping[str, Mapping[str, Any]], scales: Any, weights: Any,
                  method: str, **kw: Any) -> dict[str, dict[str, Any]]:
  """Applies `merge_loras` at every site of a stacked library.

  Args:
    stacked: site name -> {'lora_a': [E, D, R], 'lora_b': [E, R, F]} (lists
      of per-expert arrays are accepted as in `merge_loras`).
    scales: [E] (or scalar) shared by all sites, or site -> [E].
    weights: [E] (or scalar / None) shared by all sites, or site -> [E].
    method: see `merge_loras`.
    **kw: forwarded to `merge_loras`. A given `rng` is folded with the site's
      position in sorted order, so that sites draw different DARE masks.

  Returns:
    site -> {'lora_a': [D, R'], 'lora_b': [R', F], 'scale': float}.
  """
  if not stacked:
    raise MergeError("stacked library is empty: no sites to merge")
  rng = kw.pop("rng", None)
  merged = {}
  for index, site in enumerate(sorted(stacked)):
    entry = stacked[site]
    missing = {"lora_a", "lora_b"} - set(entry)
    if missing:
      raise MergeError(f"stacked[{site!r}] lacks {sorted(missing)}")
    for name, value in (("scales", scales), ("weights", weights)):
      if isinstance(value, Mapping) and site not in value:
        raise MergeError(f"{name} is a per-site mapping but has no entry for site {site!r}")
    site_scales = scales[site] if isinstance(scales, Mapping) else scales
    site_weights = weights[site] if isinstance(weights, Mapping) else weights
    site_rng = None if rng is None else jax.random.fold_in(rng, index)
    try:
      a, b, scale = merge_loras(entry["lora_a"], entry["lora_b"], site_scales, site_weights,
                                method, rng=site_rng, **kw)
    except MergeError as err:
      raise MergeError(f"site {site!r}: {err}") from err
    merged[site] = {"lora_a": a, "lora_b": b, "scale": scale}
  return merged
