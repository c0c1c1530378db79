"""Poly / MHR sites: equivalences with LoRA, routing weights, Gumbel-sigmoid statistics, variants,
gradients, few-shot adaptation masks, optimiser groups and the gin files."""
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax.methods import polytropon as poly
from phatgoose_jax.models import Transformer, tiny_config

D, F, R, B, L = 12, 20, 3, 3, 5
GIN_DIR = pathlib.Path(__file__).parents[2] / "gin"


def _site(**kw):
  cfg = poly.PolytroponConfig(**{"num_tasks": 4, "num_skills": 3, "rank": R, **kw})
  return poly.PolySite(features=F, kernel_axes=("embed", "mlp"), site="encoder/layers_0/mlp/wi_0",
                       poly=cfg)


def _init(site, seed=0, random_b=True):
  """Variables with random skills_b (zero at init, which would hide the routing) and random Z."""
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))
  ids = jnp.array([2, 0, 2])
  v = site.init({"params": jax.random.PRNGKey(seed + 1)}, x, task_ids=ids)
  v = dict(v)
  ad = dict(v["adapters"])
  k = jax.random.split(jax.random.PRNGKey(seed + 2), 2)
  if random_b:
    ad["skills_b"] = jax.random.normal(k[0], ad["skills_b"].shape)
  ad["module_logits"] = jax.random.normal(k[1], ad["module_logits"].shape)
  v["adapters"] = ad
  return v, x, ids


def _manual_delta(x, a, b, w, scale):
  """numpy reference: per example, per head block mixing of A rows / B columns."""
  x, a, b, w = map(np.asarray, (x, a, b, w))
  nb, h, k = w.shape
  d, f = a.shape[1], b.shape[2]
  out = np.zeros(x.shape[:-1] + (f,))
  for i in range(nb):
    am = np.zeros((d, a.shape[2]))
    bm = np.zeros((b.shape[1], f))
    for j in range(h):
      rs, cs = slice(j * d // h, (j + 1) * d // h), slice(j * f // h, (j + 1) * f // h)
      for s in range(k):
        am[rs] += w[i, j, s] * a[s, rs]
        bm[:, cs] += w[i, j, s] * b[s, :, cs]
    out[i] = x[i] @ am @ bm * scale
  return out


def test_k1_equals_plain_lora():
  site = _site(num_skills=1)
  v, x, ids = _init(site)
  y = site.apply(v, x, task_ids=ids)
  a, b = v["adapters"]["skills_a"][0], v["adapters"]["skills_b"][0]
  want = np.asarray(x) @ np.asarray(v["params"]["kernel"]) + np.asarray(x) @ a @ b / R
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_eval_output_matches_sigmoid_normalised_mixing(heads):
  site = _site(num_heads=heads)
  v, x, ids = _init(site)
  z = np.asarray(v["adapters"]["module_logits"])
  s = 1 / (1 + np.exp(-z[np.asarray(ids)]))  # [B, H, K]
  w = s / (s.sum(-1, keepdims=True) + 1e-12)
  np.testing.assert_allclose(poly.routing_weights(z, ids), w, rtol=1e-6, atol=1e-7)
  y = site.apply(v, x, task_ids=ids)
  want = np.asarray(x) @ np.asarray(v["params"]["kernel"]) + _manual_delta(
      x, v["adapters"]["skills_a"], v["adapters"]["skills_b"], w, 1.0 / R)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_mhr_with_equal_heads_equals_poly_and_differs_otherwise():
  mhr, p1 = _site(num_heads=4), _site(num_heads=1)
  v, x, ids = _init(mhr)
  z1 = v["adapters"]["module_logits"][:, :1]  # [T, 1, K]
  vp = {**v, "adapters": {**v["adapters"], "module_logits": z1}}
  vm = {**v, "adapters": {**v["adapters"], "module_logits": jnp.repeat(z1, 4, axis=1)}}
  np.testing.assert_allclose(mhr.apply(vm, x, task_ids=ids), p1.apply(vp, x, task_ids=ids),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(mhr.apply(v, x, task_ids=ids), p1.apply(vp, x, task_ids=ids), atol=1e-4)


def test_gumbel_sigmoid_statistics():
  n = 200_000
  zs = jnp.array([-2.0, -0.5, 0.0, 1.5])
  draws = jax.vmap(lambda k: poly.gumbel_sigmoid(k, zs))(
      jax.random.split(jax.random.PRNGKey(3), n))  # [n, 4]
  draws = np.asarray(draws, np.float64)
  p = 1 / (1 + np.exp(-np.asarray(zs, np.float64)))
  # The hard decision of a RelaxedBernoulli sample is exactly Bernoulli(sigmoid(z)).
  frac = (draws > 0.5).mean(0)
  assert np.all(np.abs(frac - p) < 4.5 * np.sqrt(p * (1 - p) / n)), (frac, p)
  # The mean tends to E[sigmoid(z + Logistic)] (midpoint quadrature over u), = 1/2 at z = 0.
  u = (np.arange(1_000_000) + 0.5) / 1_000_000
  expect = np.array([np.mean(1 / (1 + np.exp(-(z + np.log(u) - np.log1p(-u))))) for z in zs])
  sem = draws.std(0) / np.sqrt(n)
  assert np.all(np.abs(draws.mean(0) - expect) < 4.5 * sem), (draws.mean(0), expect)
  assert abs(expect[2] - 0.5) < 1e-9
  assert draws.std(0).min() > 0.1  # genuinely stochastic


def test_training_mode_is_stochastic_and_eval_deterministic():
  site = _site(num_heads=2)
  v, x, ids = _init(site)
  ev = site.apply(v, x, task_ids=ids)
  np.testing.assert_array_equal(ev, site.apply(v, x, task_ids=ids, training=False))
  t1 = site.apply(v, x, task_ids=ids, training=True, rngs={"routing": jax.random.PRNGKey(1)})
  t2 = site.apply(v, x, task_ids=ids, training=True, rngs={"routing": jax.random.PRNGKey(2)})
  assert not np.allclose(t1, t2, atol=1e-5)
  assert not np.allclose(t1, ev, atol=1e-5)


def test_poly_mu_averages_skills_and_merge_skills():
  site = _site(routing="uniform", num_heads=2)
  v, x, ids = _init(site)
  a = np.asarray(v["adapters"]["skills_a"]).mean(0)
  b = np.asarray(v["adapters"]["skills_b"]).mean(0)
  want = np.asarray(x) @ (np.asarray(v["params"]["kernel"]) + a @ b / R)
  np.testing.assert_allclose(site.apply(v, x, task_ids=ids), want, rtol=1e-4, atol=1e-5)
  merged = poly.merge_skills({"s": v["adapters"]})["s"]
  np.testing.assert_allclose(merged["lora_a"], a, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(merged["lora_b"], b, rtol=1e-6, atol=1e-7)


def test_gradients_reach_z_rows_used_and_skills():
  site = _site(num_heads=2)
  v, x, ids = _init(site)
  c = jax.random.normal(jax.random.PRNGKey(9), (B, L, F))

  def loss(adapters):
    y = site.apply({**v, "adapters": adapters}, x, task_ids=ids, training=True,
                   rngs={"routing": jax.random.PRNGKey(4)})
    return jnp.sum(y * c)

  g = jax.grad(loss)(v["adapters"])
  gz = np.abs(np.asarray(g["module_logits"])).sum((1, 2))
  assert gz[0] > 0 and gz[2] > 0 and gz[1] == 0 and gz[3] == 0  # only tasks in the batch
  assert np.abs(g["skills_a"]).sum() > 0 and np.abs(g["skills_b"]).sum() > 0


def test_bad_inputs_raise_named_errors():
  site = _site(num_heads=5)  # 5 does not divide D=12
  x = jnp.ones((B, L, D))
  with pytest.raises(poly.PolytroponError, match="num_heads"):
    site.init({"params": jax.random.PRNGKey(0)}, x, task_ids=jnp.zeros((B,), jnp.int32))
  with pytest.raises(poly.PolytroponError, match="task_ids"):
    _site().init({"params": jax.random.PRNGKey(0)}, x)
  with pytest.raises(poly.PolytroponError, match="training"):
    _site().init({"params": jax.random.PRNGKey(0)}, x, task_ids=jnp.zeros((B,), jnp.int32),
                 training=jnp.array(True))
  with pytest.raises(poly.PolytroponError, match="num_skills"):
    poly.PolytroponConfig(num_skills=0)
  with pytest.raises(poly.PolytroponError, match="routing"):
    poly.PolytroponConfig(routing="soft")


def test_out_of_range_task_ids_are_named_errors_not_nan_or_wrapped():
  site = _site()  # num_tasks=4
  v, x, _ = _init(site)
  for ids in ([0, 4, 1], [0, -1, 1]):  # past the last row; -1 used to wrap to task 3
    with pytest.raises(poly.PolytroponError, match=r"site_inputs\['task_ids'\].*\[0, 4\)"):
      site.apply(v, x, task_ids=jnp.asarray(ids))
  with pytest.raises(poly.PolytroponError, match="task_ids"):
    poly.routing_weights(v["adapters"]["module_logits"], jnp.asarray([7]))
  # Under jit the ids cannot be checked: a bad id gives NaN, never another task's weights.
  y = jax.jit(lambda ids: site.apply(v, x, task_ids=ids))(jnp.asarray([0, 9, 1]))
  y = np.asarray(y)
  assert np.all(np.isnan(y[1])) and np.all(np.isfinite(y[[0, 2]]))


def test_loaded_adapters_must_match_the_config():
  site = _site()  # K=3 skills, rank R, one head
  v, x, ids = _init(site)
  ad = v["adapters"]
  bad = {"skills_a": jnp.zeros((3, D, R + 1)), "skills_b": jnp.zeros((3, R + 1, F)),
         "module_logits": jnp.zeros((4, 2, 3))}
  for name, value in bad.items():
    with pytest.raises(poly.PolytroponError, match=rf"adapters {name} must be"):
      site.apply({**v, "adapters": {**ad, name: value}}, x, task_ids=ids)
  with pytest.raises(poly.PolytroponError, match="'routing' rng"):
    site.apply(v, x, task_ids=ids, training=True)


def test_merge_skills_weights_and_z_row_mask_are_checked():
  tree = {"a": {"module_logits": jnp.zeros((2, 1, 3)), "skills_a": jnp.ones((3, 4, 2)),
                "skills_b": jnp.ones((3, 2, 5))}}
  w = jnp.asarray([[0.2, 0.3, 0.5]])
  merged = poly.merge_skills(tree, w)["a"]
  np.testing.assert_allclose(merged["lora_a"], np.ones((4, 2)))  # weights sum to 1
  with pytest.raises(poly.PolytroponError, match="weights must be"):
    poly.merge_skills(tree, jnp.asarray([0.2, 0.3, 0.5]))
  for row in (2, -1, 1.0):
    with pytest.raises(poly.PolytroponError, match="row="):
      poly.trainable_mask(tree, "z_row", row=row)


def test_poly_optimizer_uses_higher_lr_for_z():
  tree = {"site": {"module_logits": jnp.zeros((2, 1, 3)), "skills_a": jnp.zeros((3, 4, 2))}}
  tx = poly.poly_optimizer(1e-3, 0.1)
  grads = jax.tree.map(jnp.ones_like, tree)
  updates, _ = tx.update(grads, tx.init(tree), tree)
  np.testing.assert_allclose(updates["site"]["module_logits"], -0.1, rtol=1e-4)
  np.testing.assert_allclose(updates["site"]["skills_a"], -1e-3, rtol=1e-4)


def test_add_rows_and_masks():
  tree = {"a": {"module_logits": jnp.array([[[1.0, 3.0]], [[3.0, 5.0]]]), "skills_a": jnp.ones(2)}}
  assert np.all(poly.add_task_rows(tree, 1, "uniform")["a"]["module_logits"][2] == 0)
  np.testing.assert_allclose(poly.add_task_rows(tree, 1, "mean")["a"]["module_logits"][2],
                             [[2.0, 4.0]])
  m = poly.trainable_mask(poly.add_task_rows(tree), "z_row", row=2)
  assert m["a"]["skills_a"] == 0
  np.testing.assert_array_equal(np.asarray(m["a"]["module_logits"]).ravel(), [0, 0, 1])
  assert poly.trainable_mask(tree, "z")["a"]["skills_a"] == 0
  assert poly.trainable_mask(tree, "skills")["a"]["module_logits"] == 0


@pytest.fixture(scope="module")
def tiny_poly():
  cfg = poly.PolytroponConfig(num_tasks=3, num_skills=2, num_heads=2, rank=2,
                              site_pattern=r"(encoder|decoder)/layers_0/(attention/query|mlp/.*)")
  model = Transformer(tiny_config(num_encoder_layers=1, num_decoder_layers=1),
                      poly.make_poly_site_factory(cfg))
  rng = np.random.RandomState(0)
  batch = {"encoder_input_tokens": rng.randint(1, 96, (2, 7)).astype(np.int32),
           "decoder_input_tokens": rng.randint(1, 96, (2, 5)).astype(np.int32),
           "decoder_target_tokens": rng.randint(1, 96, (2, 5)).astype(np.int32)}
  init = jax.jit(lambda k: model.init(
      {"params": k}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], enable_dropout=False,
      site_inputs={"task_ids": jnp.zeros((2,), jnp.int32)}))
  v = init(jax.random.PRNGKey(0))
  v = dict(v)
  leaves, treedef = jax.tree.flatten(v["adapters"])
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  v["adapters"] = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, l.shape)
                                               for k, l in zip(keys, leaves)])
  return model, v, batch


def test_site_paths_and_collection_layout(tiny_poly):
  model, v, _ = tiny_poly
  site = v["adapters"]["encoder"]["layers_0"]["attention"]["query"]
  assert site["skills_a"].shape == (2, 24, 2) and site["skills_b"].shape == (2, 2, 24)
  assert site["module_logits"].shape == (3, 2, 2)
  assert "kernel" in v["params"]["encoder"]["layers_0"]["attention"]["query"]
  assert "key" not in v["adapters"]["encoder"]["layers_0"]["attention"]  # outside site_pattern
  assert "adapters_axes" in v


def test_mhr_z_adaptation_trains_only_the_new_row(tiny_poly):
  model, v, batch = tiny_poly
  cfg = poly.PolyAdaptConfig(train="z", steps=3, z_learning_rate=0.5)
  out, new_id, losses = poly.adapt_to_new_task(model, v, [batch], jax.random.PRNGKey(1), cfg)
  assert new_id == 3 and len(losses) == 3 and np.all(np.isfinite(losses))
  for path, old in jax.tree_util.tree_leaves_with_path(v["adapters"]):
    new = out["adapters"]
    for k in path:
      new = new[k.key]
    if path[-1].key == "module_logits":
      np.testing.assert_array_equal(new[:3], old)
      assert np.abs(np.asarray(new[3])).max() > 1e-3  # the new row moved off its zero init
    else:
      np.testing.assert_array_equal(new, old)
  jax.tree.map(np.testing.assert_array_equal, out["params"], v["params"])


def test_repeated_adaptation_reuses_one_compiled_step(tiny_poly):
  model, v, batch = tiny_poly
  cfg = poly.PolyAdaptConfig(train="z", steps=2, z_learning_rate=0.3)
  first, _, losses_1 = poly.adapt_to_new_task(model, v, [batch], jax.random.PRNGKey(5), cfg)
  traces = poly.ADAPT_STEP_TRACES[0]
  other = dict(batch, decoder_target_tokens=np.roll(np.asarray(batch["decoder_target_tokens"]), 1,
                                                    axis=0))
  second, _, losses_2 = poly.adapt_to_new_task(model, v, [other], jax.random.PRNGKey(6), cfg)
  assert poly.ADAPT_STEP_TRACES[0] == traces  # same model, config and shapes: no retrace
  assert losses_1 != losses_2  # ... yet the second call used its own batch and rng
  z = lambda out: out["adapters"]["decoder"]["layers_0"]["mlp"]["wo"]["module_logits"]
  assert not np.allclose(z(first)[-1], z(second)[-1])


def test_z_and_skills_adaptation_updates_skills(tiny_poly):
  model, v, batch = tiny_poly
  cfg = poly.PolyAdaptConfig(train="z_and_skills", steps=2, learning_rate=1e-2)
  out, _, _ = poly.adapt_to_new_task(model, v, [batch], jax.random.PRNGKey(1), cfg)
  a_old = v["adapters"]["decoder"]["layers_0"]["mlp"]["wo"]["skills_a"]
  a_new = out["adapters"]["decoder"]["layers_0"]["mlp"]["wo"]["skills_a"]
  assert not np.allclose(a_old, a_new)


@pytest.mark.parametrize("name,heads,train", [("polytropon", 1, "z_and_skills"),
                                              ("mhr", 8, "z")])
def test_gin_files_build(name, heads, train):
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_DIR))
    gin.parse_config_files_and_bindings([str(GIN_DIR / "routers" / f"{name}.gin")], [],
                                        finalize_config=True)
    cfg = poly.PolytroponConfig()
    assert (cfg.num_heads, cfg.num_tasks, cfg.num_skills) == (heads, 36, 8)
    assert poly.PolyAdaptConfig().train == train
    assert gin.query_parameter("poly_optimizer.z_learning_rate") == 0.1
  finally:
    gin.clear_config()
