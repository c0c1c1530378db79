"""Tests for phatgoose_jax.merging: PEFT reference numbers and properties.

Letters: E experts, D site input, F site output, R LoRA rank.
The reference arrays in tests/testdata/peft_merging were produced by HF PEFT's
own `add_weighted_adapter` (scripts/make_peft_merge_fixture.py; see README).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import merging
from phatgoose_jax.merging import MergeError, merge_library, merge_loras

_DATA = os.path.join(os.path.dirname(__file__), "testdata", "peft_merging")
_SITES = ("lin1", "lin2")
_GROUP_ADAPTERS = {"equal": ("e0", "e1", "e2"), "mixed": ("m0", "m1"), "single": ("e0",)}


def _load():
  with open(os.path.join(_DATA, "cases.json")) as f:
    meta = json.load(f)
  inputs = np.load(os.path.join(_DATA, "inputs.npz"))
  return meta, inputs, np.load(os.path.join(_DATA, "merged.npz"))


_META, _INPUTS, _MERGED = _load()


def _peft_inputs(group, site):
  """Our convention: a = lora_A.T [D, R], b = lora_B.T [R, F]."""
  names = _GROUP_ADAPTERS[group]
  a = [_INPUTS[f"{group}/{site}/{n}/lora_A"].T for n in names]
  b = [_INPUTS[f"{group}/{site}/{n}/lora_B"].T for n in names]
  s = [float(_INPUTS[f"{group}/{site}/{n}/scaling"]) for n in names]
  return a, b, s, _INPUTS[f"{group}/weights"]


def _random_experts(seed, ranks, d=13, f=11):
  rng = np.random.default_rng(seed)
  a = [rng.normal(size=(d, r)).astype(np.float32) for r in ranks]
  b = [rng.normal(size=(r, f)).astype(np.float32) for r in ranks]
  return a, b


def _delta(a, b, scale):
  return scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)


# ---------------------------------------------------------------------------
# Against HF PEFT.
# ---------------------------------------------------------------------------


def test_fixture_covers_every_peft_method():
  methods = {c["combination_type"] for c in _META["cases"].values()}
  assert methods == set(merging.PEFT_METHODS)


@pytest.mark.parametrize("case", sorted(_META["cases"]))
@pytest.mark.parametrize("site", _SITES)
def test_matches_peft_add_weighted_adapter(case, site):
  kw = dict(_META["cases"][case])
  group, method = kw.pop("group"), kw.pop("combination_type")
  a_in, b_in, scales, weights = _peft_inputs(group, site)
  a, b, scale = merge_loras(a_in, b_in, scales, weights, method, **kw)
  a, b = np.asarray(a), np.asarray(b)
  ref_a = _MERGED[f"{case}/{site}/lora_A"].T  # [D, R']
  ref_b = _MERGED[f"{case}/{site}/lora_B"].T  # [R', F]
  ref_delta = _MERGED[f"{case}/{site}/delta"].T  # [D, F]
  assert scale == pytest.approx(float(_MERGED[f"{case}/{site}/scaling"]))
  assert a.shape == ref_a.shape and b.shape == ref_b.shape
  np.testing.assert_allclose(scale * a @ b, ref_delta, atol=1e-5, rtol=0)
  if method.endswith("svd"):
    # Singular vectors are defined up to a sign per component; align them
    # (a no-op when both LAPACKs agree, as they did when this was written).
    sign = np.where(np.sum(a * ref_a, axis=0) < 0, -1.0, 1.0)
    a, b = a * sign[None, :], b * sign[:, None]
  np.testing.assert_allclose(a, ref_a, atol=1e-5, rtol=0)
  np.testing.assert_allclose(b, ref_b, atol=1e-5, rtol=0)


def test_peft_linear_is_not_the_update_average():
  a_in, b_in, scales, weights = _peft_inputs("equal", "lin1")
  a, b, _ = merge_loras(a_in, b_in, scales, weights, "linear")
  weighted_sum = sum(w * _delta(a_e, b_e, s) for a_e, b_e, s, w in zip(a_in, b_in, scales, weights))
  assert np.abs(np.asarray(a) @ np.asarray(b) - weighted_sum).max() > 0.1
  # ... but it is the product of the sqrt-weighted factor sums (sign on a).
  c = np.asarray(weights) * np.asarray(scales)
  a_ref = sum(np.sign(c_e) * np.sqrt(abs(c_e)) * a_e for c_e, a_e in zip(c, a_in))
  b_ref = sum(np.sqrt(abs(c_e)) * b_e for c_e, b_e in zip(c, b_in))
  np.testing.assert_allclose(a, a_ref, atol=1e-5)
  np.testing.assert_allclose(b, b_ref, atol=1e-5)


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------


def test_ties_density_one_single_adapter_is_that_adapter():
  a_in, b_in = _random_experts(0, [3])
  a, b, scale = merge_loras(a_in, b_in, [0.5], [1.0], "ties", 1.0)
  np.testing.assert_allclose(scale * np.asarray(a) @ np.asarray(b), _delta(a_in[0], b_in[0], 0.5),
                             atol=1e-5)
  # The ties merge itself (no PEFT one-adapter fallback) keeps the tensor.
  t = jnp.asarray(a_in[0])[None]
  np.testing.assert_allclose(merging.combine(t, jnp.ones(1), "ties", 1.0, "total", None), a_in[0])


def test_ties_hand_example():
  # Two experts, four entries; density 1 (no pruning), weights 1 and 2.
  t = jnp.array([[1.0, -2.0, 3.0, 0.0], [-3.0, 1.0, 2.0, 0.0]])
  w = jnp.array([1.0, 2.0])
  total = merging.combine(t, w, "ties", 1.0, "total", None)
  # Entry 0: sum -2 -> elected -, keep expert 1 only: 2 * -3 = -6.
  # Entry 1: sum -1 -> -, keep expert 0: -2.  Entry 2: both +: (3 + 4) / 2.
  # Entry 3: zeros never agree: 0 / max(0, 1).
  np.testing.assert_allclose(total, [-6.0, -2.0, 3.5, 0.0])
  freq = merging.combine(t, w, "ties", 1.0, "frequency", None)
  # Frequency: entries 0 and 1 have one + and one - -> tie goes to +.
  np.testing.assert_allclose(freq, [1.0, 2.0, 3.5, 0.0])


def test_magnitude_prune_keeps_int_density_times_numel():
  t = jnp.asarray(np.random.default_rng(1).normal(size=(3, 13, 3)), jnp.float32)
  pruned = np.asarray(merging.magnitude_prune_each(t, 0.6))
  k = int(0.6 * 39)
  for e in range(3):
    kept = pruned[e] != 0
    assert kept.sum() == k
    assert np.abs(t[e])[kept].min() >= np.abs(t[e])[~kept].max()


@pytest.mark.parametrize("method", ["cat", "delta_average"])
def test_cat_and_delta_average_are_exact(method):
  a_in, b_in = _random_experts(2, [2, 5, 3])
  scales, weights = [0.5, 2.0, 1.5], [0.3, -0.8, 1.1]
  a, b, scale = merge_loras(a_in, b_in, scales, weights, method)
  assert a.shape == (13, 10) and b.shape == (10, 11)
  target = sum(w * _delta(a_e, b_e, s) for a_e, b_e, s, w in zip(a_in, b_in, scales, weights))
  if method == "delta_average":
    target = target / sum(weights)
  np.testing.assert_allclose(scale * np.asarray(a) @ np.asarray(b), target, atol=1e-5)


def test_delta_average_default_weights_are_uniform():
  a_in, b_in = _random_experts(3, [3, 3])
  a, b, scale = merge_loras(a_in, b_in, 2.0, None, "delta_average")
  target = (_delta(a_in[0], b_in[0], 2.0) + _delta(a_in[1], b_in[1], 2.0)) / 2
  np.testing.assert_allclose(scale * np.asarray(a) @ np.asarray(b), target, atol=1e-5)


def test_uniform_factor_is_mean_a_times_mean_b():
  a_in, b_in = _random_experts(4, [3, 3, 3, 3])
  a, b, scale = merge_loras(np.stack(a_in), np.stack(b_in), 0.25, None, "uniform_factor")
  np.testing.assert_allclose(a, np.mean(a_in, axis=0), atol=1e-6)
  np.testing.assert_allclose(b, np.mean(b_in, axis=0), atol=1e-6)
  assert scale == 0.25
  # Different scales are folded into a; the update is unchanged in form.
  scales = [1.0, 2.0, 3.0, 4.0]
  a2, b2, scale2 = merge_loras(a_in, b_in, scales, [1, 1, 1, 1], "uniform_factor")
  expect = np.mean([s * a_e for s, a_e in zip(scales, a_in)], axis=0) @ np.mean(b_in, axis=0)
  np.testing.assert_allclose(scale2 * np.asarray(a2) @ np.asarray(b2), expect, atol=1e-5)


@pytest.mark.parametrize("full_matrices,svd_rank", [(True, 11), (False, 20), (True, None)])
def test_svd_with_enough_rank_reproduces_update(full_matrices, svd_rank):
  a_in, b_in = _random_experts(5, [2, 2])  # the sum has rank 4; default svd_rank is 2
  scales, weights = [1.5, 0.5], [1.0, -2.0]
  target = sum(w * _delta(a_e, b_e, s) for a_e, b_e, s, w in zip(a_in, b_in, scales, weights))
  a, b, scale = merge_loras(a_in, b_in, scales, weights, "svd", svd_rank=svd_rank,
                            svd_full_matrices=full_matrices)
  got = scale * np.asarray(a) @ np.asarray(b)
  if svd_rank is None:  # rank 2 < 4: the best rank-2 approximation, not exact.
    assert a.shape == (13, 2)
    sv = np.linalg.svd(target, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(got - target), np.linalg.norm(sv[2:]), rtol=1e-4)
  else:
    assert a.shape[1] == 11
    np.testing.assert_allclose(got, target, atol=1e-5)


def test_svd_clamp_bounds_factors():
  a_in, b_in = _random_experts(6, [3, 3])
  a, b, _ = merge_loras(a_in, b_in, [1.0, 1.0], [1.0, 1.0], "svd", svd_clamp=0.5)
  a0, b0, _ = merge_loras(a_in, b_in, [1.0, 1.0], [1.0, 1.0], "svd")
  hi = np.quantile(np.concatenate([np.ravel(a0), np.ravel(b0)]), 0.5)
  np.testing.assert_allclose(a, np.clip(a0, -hi, hi), atol=1e-6)
  np.testing.assert_allclose(b, np.clip(b0, -hi, hi), atol=1e-6)


_DARE_SCALES, _DARE_WEIGHTS = [1.0, 0.5, 2.0], [0.4, 0.9, -0.3]


def _dare_experts():
  # One set of shapes for every density < 1 test: threefry compiles are slow.
  a_in, b_in = _random_experts(7, [3, 3, 3])
  return np.stack(a_in), np.stack(b_in)


def test_dare_preserves_expectation():
  a_in, b_in = _dare_experts()
  density = 0.5
  lin_a, lin_b, _ = merge_loras(a_in, b_in, _DARE_SCALES, _DARE_WEIGHTS, "linear")
  keys = jax.random.split(jax.random.PRNGKey(0), 1000)
  draws = [merge_loras(a_in, b_in, _DARE_SCALES, _DARE_WEIGHTS, "dare_linear", density, rng=k)
           for k in keys]
  a = np.stack([np.asarray(d[0]) for d in draws])  # [N, D, R]
  b = np.stack([np.asarray(d[1]) for d in draws])  # [N, R, F]
  assert not np.allclose(a[0], lin_a)
  for samples, expect in ((a, np.asarray(lin_a)), (b, np.asarray(lin_b))):
    # Unbiased: every entry's sample mean is within 5 standard errors.
    stderr = samples.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(samples.mean(0) - expect) <= 5 * stderr + 1e-6)
    # Without the 1/density rescale the mean would be off by half.
    assert np.abs(samples.mean(0) * density - expect).max() > 10 * stderr.max()


def test_dare_rng_reproducible_and_required():
  a_in, b_in = _dare_experts()
  args = (a_in, b_in, _DARE_SCALES, _DARE_WEIGHTS, "dare_linear", 0.5)
  first = merge_loras(*args, rng=jax.random.PRNGKey(3))[0]
  again = merge_loras(*args, rng=jax.random.PRNGKey(3))[0]
  other = merge_loras(*args, rng=jax.random.PRNGKey(4))[0]
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  for method in ("dare_linear", "dare_ties", "dare_ties_svd"):
    with pytest.raises(MergeError, match="rng"):
      merge_loras(a_in, b_in, _DARE_SCALES, _DARE_WEIGHTS, method, 0.5)


def test_dtype_is_kept():
  a_in, b_in = _random_experts(9, [3, 3])
  a, b, _ = merge_loras(jnp.asarray(np.stack(a_in), jnp.bfloat16),
                        jnp.asarray(np.stack(b_in), jnp.bfloat16), 1.0, [0.5, 0.5], "ties", 0.6)
  assert a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# merge_library.
# ---------------------------------------------------------------------------


def test_merge_library_site_by_site():
  lib = {}
  for i, site in enumerate(["encoder/layers_0/attention/query", "decoder/layers_0/mlp/wo"]):
    a_in, b_in = _random_experts(10 + i, [3, 3, 3], d=7, f=5)
    lib[site] = {"lora_a": np.stack(a_in), "lora_b": np.stack(b_in)}
  weights = [0.2, 0.3, 0.5]
  out = merge_library(lib, 0.5, weights, "magnitude_prune", density=0.6)
  assert set(out) == set(lib)
  for site, entry in lib.items():
    a, b, scale = merge_loras(entry["lora_a"], entry["lora_b"], 0.5, weights, "magnitude_prune",
                              0.6)
    np.testing.assert_array_equal(out[site]["lora_a"], a)
    np.testing.assert_array_equal(out[site]["lora_b"], b)
    assert out[site]["scale"] == scale
  # DARE masks differ between sites of the same shape.
  a_dare, b_dare = _dare_experts()
  same = {"x": {"lora_a": a_dare, "lora_b": b_dare}, "y": {"lora_a": a_dare, "lora_b": b_dare}}
  dare = merge_library(same, _DARE_SCALES, _DARE_WEIGHTS, "dare_linear", density=0.5,
                       rng=jax.random.PRNGKey(0))
  assert not np.allclose(dare["x"]["lora_a"], dare["y"]["lora_a"])
  per_site = merge_library(same, {"x": 1.0, "y": 2.0}, weights, "cat")
  np.testing.assert_allclose(per_site["y"]["lora_a"], 2 * np.asarray(per_site["x"]["lora_a"]),
                             rtol=1e-6)
  with pytest.raises(MergeError, match="scales.*'y'"):
    merge_library(same, {"x": 1.0}, weights, "cat")
  with pytest.raises(MergeError, match="'x'.*lora_b"):
    merge_library({"x": {"lora_a": np.zeros((2, 3, 1))}}, 1.0, [1, 1], "linear")


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(method="avg"), "method"),
    (dict(method="ties"), "density"),
    (dict(method="ties", density=1.5), "density"),
    (dict(method="dare_linear", density=0.0), "density"),
    (dict(method="linear", density=0.5), "density"),
    (dict(method="linear", svd_rank=2), "svd_rank"),
    (dict(method="svd", svd_rank=0), "svd_rank"),
    (dict(method="svd", svd_rank=12), "svd_rank"),
    (dict(method="svd", svd_clamp=2.0), "svd_clamp"),
    (dict(method="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
    (dict(method="linear", weights=[1.0]), "weights"),
    (dict(method="linear", weights=None), "weights"),
    (dict(method="cat", scales=[1.0, 2.0, 3.0]), "scales"),
    (dict(method="uniform_factor", weights=[1.0, 2.0]), "uniform"),
    (dict(method="delta_average", weights=[1.0, -1.0]), "sum"),
])
def test_bad_arguments_raise(kwargs, pattern):
  a_in, b_in = _random_experts(11, [3, 3])
  args = dict(lora_as=a_in, lora_bs=b_in, scales=1.0, weights=[1.0, 2.0])
  args.update(kwargs)
  with pytest.raises(MergeError, match=pattern):
    merge_loras(**args)


def test_bad_shapes_raise():
  a_in, b_in = _random_experts(12, [2, 3])
  with pytest.raises(MergeError, match="equal rank"):
    merge_loras(a_in, b_in, 1.0, [1.0, 1.0], "linear")
  with pytest.raises(MergeError, match="lora_bs"):
    merge_loras(a_in, b_in[:1], 1.0, [1.0, 1.0], "cat")
  with pytest.raises(MergeError, match="expert 1"):
    merge_loras(a_in, [b_in[0], b_in[0]], 1.0, [1.0, 1.0], "cat")
  with pytest.raises(MergeError, match="lora_as"):
    merge_loras(np.zeros((13, 3)), b_in, 1.0, [1.0, 1.0], "cat")


def test_bad_argument_types_are_named_merge_errors():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 5, 2)).astype(np.float32)
  b = rng.normal(size=(3, 2, 4)).astype(np.float32)
  # numpy / jax scalars are accepted as density (a static jit argument) and agree with a float
  want = merging.merge_loras(a, b, 0.5, [1, 1, 1], "ties", density=0.5)[0]
  for density in (np.float32(0.5), jnp.float32(0.5)):
    np.testing.assert_allclose(merging.merge_loras(a, b, 0.5, [1, 1, 1], "ties",
                                                   density=density)[0], want)
  cases = [(dict(method="ties", density="0.5"), "density"),
           (dict(method="svd", svd_clamp="0.5"), "svd_clamp"),
           (dict(method="svd", svd_rank=True), "svd_rank"),
           (dict(method="dare_linear", density=0.5, rng=0), "rng"),
           (dict(method="linear", weights=["a", "b", "c"]), "weights"),
           (dict(method="linear", scales=None), "scales")]
  for kw, match in cases:
    args = {"scales": 0.5, "weights": [1, 1, 1], **kw}
    with pytest.raises(merging.MergeError, match=match):
      merging.merge_loras(a, b, args.pop("scales"), args.pop("weights"), args.pop("method"),
                          **args)
  # one expert: dare falls back to linear as PEFT does, so no rng is needed
  merging.merge_loras(a[:1], b[:1], 0.5, [1.0], "dare_linear", density=0.5)
