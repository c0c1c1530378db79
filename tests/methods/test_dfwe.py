"""DFWE and LoraHub: combined factors, one compilation for all candidates, DFWE concentrates on the
expert that generated the few-shot data, LoraHub respects bounds / budget / objective, gin builds."""
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax.library.format import site_shapes
from phatgoose_jax.methods import dfwe as M
from phatgoose_jax.models import greedy_decode, tiny_config

GIN_DIR = pathlib.Path(__file__).parents[2] / "gin"
CFG = tiny_config(num_encoder_layers=1, num_decoder_layers=1)
E, R, TARGET = 3, 3, 1


@pytest.fixture(scope="module")
def problem():
  """3 random experts on a few sites; few-shot targets = greedy outputs of expert TARGET."""
  params = ad.init_variables(ad.build_model(CFG), jax.random.PRNGKey(0))["params"]
  shapes = site_shapes(CFG)
  sites = ["encoder/layers_0/mlp/wo", "decoder/layers_0/mlp/wo"]
  rng = np.random.default_rng(0)
  stacked = {s: {"lora_a": rng.normal(0, 1.0, (E, shapes[s][0], R)).astype(np.float32),
                 "lora_b": rng.normal(0, 1.0, (E, R, shapes[s][1])).astype(np.float32),
                 "scale": np.full((E,), 1.0 / R, np.float32)} for s in sites}
  enc = rng.integers(2, 96, (12, 7)).astype(np.int32)
  only = {s: {k: v[TARGET:TARGET + 1] for k, v in e.items()} for s, e in stacked.items()}
  model = M.single_lora_model(CFG, sites, R, 1.0)
  variables = {"params": params, "adapters": M.combined_adapters(only, jnp.ones(1), "delta")}
  tgt = np.asarray(greedy_decode(model, variables, jnp.asarray(enc), 5, eos_id=-1))
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
           "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}
  return params, stacked, batch


def test_combined_site_factors():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(E, 5, R)).astype(np.float32)
  b = rng.normal(size=(E, R, 7)).astype(np.float32)
  s = np.array([0.5, 1.0, 2.0], np.float32)
  w = np.array([0.2, -0.7, 1.1], np.float32)
  ca, cb = M.combined_site(a, b, s, w, "delta")
  assert ca.shape == (5, E * R) and cb.shape == (E * R, 7)
  want = sum(w[e] * s[e] * a[e] @ b[e] for e in range(E))
  np.testing.assert_allclose(np.asarray(ca) @ np.asarray(cb), want, rtol=1e-4, atol=1e-5)
  fa, fb = M.combined_site(a, b, s, w, "factor")
  np.testing.assert_allclose(fa, sum(w[e] * s[e] * a[e] for e in range(E)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fb, sum(w[e] * b[e] for e in range(E)), rtol=1e-5, atol=1e-6)
  with pytest.raises(M.CombinationError, match="combine"):
    M.combined_site(a, b, s, w, "nope")


def test_loss_compiled_once_and_lowest_at_target_vertex(problem):
  params, stacked, batch = problem
  loss_fn = M.make_loss_fn(CFG, params, stacked, batch, "delta")
  vertex = [loss_fn(w) for w in np.eye(E)]
  loss_fn(np.full(E, 1 / E))
  assert int(np.argmin(vertex)) == TARGET
  assert loss_fn.batch_loss._cache_size() == 1  # weights are an input, not a constant
  with pytest.raises(M.CombinationError, match="w must be"):
    loss_fn(np.ones(E + 1))


def test_new_tasks_and_expert_values_reuse_the_compilations(problem):
  params, stacked, batch = problem
  first = M.make_loss_fn(CFG, params, stacked, batch, "delta")
  w = np.full(E, 1 / E)
  value = first(w)
  other = {s: dict(e, lora_b=e["lora_b"] * 2.0) for s, e in stacked.items()}
  second = M.make_loss_fn(CFG, params, other, dict(batch), "delta")  # new values, same shapes
  assert second.batch_loss is first.batch_loss
  assert second(w) != pytest.approx(value)  # the new experts are used...
  assert second.batch_loss._cache_size() == 1  # ... by the same compiled program
  M.finetune_stacked(CFG, params, stacked, batch, 1, 1e-3)
  before = M._finetune_step.cache_info()
  M.finetune_stacked(CFG, params, other, batch, 1, 1e-3)
  after = M._finetune_step.cache_info()
  assert after.misses == before.misses and after.hits == before.hits + E


def test_finetune_needs_one_rank_and_scale_at_every_site(problem):
  params, stacked, batch = problem
  sites = list(stacked)
  other = dict(stacked)
  other[sites[-1]] = dict(stacked[sites[-1]], scale=np.asarray(stacked[sites[-1]]["scale"]) * 2)
  with pytest.raises(M.CombinationError, match="scale"):
    M.finetune_stacked(CFG, params, other, batch, 1, 1e-3)


def test_dfwe_puts_weight_on_the_target_expert(problem):
  params, stacked, batch = problem
  cfg = M.DFWEConfig(finetune_steps=3, budget=40, seed=1)
  res = M.dfwe(CFG, params, stacked, batch, cfg)
  assert res.num_evaluations == 40
  np.testing.assert_allclose(res.weights.sum(), 1.0, rtol=1e-9)
  assert np.all(res.weights >= 0)
  assert res.weights[TARGET] >= 0.9, res.weights
  # step 1 fine-tuned the experts: factors moved, and the returned LoRA is their combination
  site = "decoder/layers_0/mlp/wo"
  assert not np.allclose(res.stacked[site]["lora_b"], stacked[site]["lora_b"])
  assert res.rank == E * R
  assert res.loss == min(h[2] for h in res.history)


def test_lorahub_bounds_budget_and_objective(problem):
  params, stacked, batch = problem
  cfg = M.LoraHubConfig(budget=40)
  res = M.lorahub(CFG, params, stacked, batch, cfg)
  assert res.num_evaluations == 40
  ws = np.stack([h[1] for h in res.history])
  assert np.all(ws >= -1.5) and np.all(ws <= 1.5)
  np.testing.assert_array_equal(ws[0], np.zeros(E))  # official init 0
  loss_fn = M.make_loss_fn(CFG, params, stacked, batch, "factor", "per_example")
  want = loss_fn(res.weights) + 0.05 * np.mean(np.abs(res.weights))
  np.testing.assert_allclose(res.objective, want, rtol=1e-5)
  assert res.objective == min(h[2] for h in res.history)
  # per_example reduction = token-mean loss / number of examples (official default_get_loss)
  mean_fn = M.make_loss_fn(CFG, params, stacked, batch, "factor", "mean")
  np.testing.assert_allclose(loss_fn(res.weights) * 12, mean_fn(res.weights), rtol=1e-5)
  assert res.rank == R
  small = M.lorahub(CFG, params, stacked, batch, M.LoraHubConfig(budget=3, bound=0.2))
  assert small.num_evaluations == 3 and np.abs(np.stack([h[1] for h in small.history])).max() <= 0.2


def test_cma_search_guards_and_optimises():
  x, v, hist = M.cma_search(lambda x: float(np.sum((x - 0.3) ** 2)), np.zeros(2), -1, 1, 200,
                            0.5, 3)
  assert len(hist) == 200 and v < 1e-4 and np.allclose(x, 0.3, atol=1e-2)
  for kw, match in ((dict(budget=0), "budget"), (dict(seed=0), "seed"),
                    (dict(sigma0=0.0), "sigma0")):
    args = dict(budget=5, sigma0=0.5, seed=1)
    args.update(kw)
    with pytest.raises(M.CombinationError, match=match):
      M.cma_search(lambda x: 0.0, np.zeros(2), -1, 1, **args)
  for popsize in (0, 1, True, 2.5):
    with pytest.raises(M.CombinationError, match="popsize"):
      M.cma_search(lambda x: 0.0, np.zeros(2), -1, 1, 5, 0.5, 1, popsize=popsize)
  with pytest.raises(M.CombinationError, match="l1_weight"):
    M.l1_penalty([1.0], -0.1)
  np.testing.assert_allclose(M.simplex_weights(np.zeros(3)), np.full(3, 1 / 3))
  assert M.l1_penalty([1.0, -1.0, 0.0, 2.0], 0.05) == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["dfwe", "lorahub"])
def test_gin_files_build(name):
  import phatgoose_jax.methods  # noqa: F401
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(GIN_DIR / "routers" / f"{name}.gin")], [])
    # The file itself binds the documented values (query_parameter raises for an unbound one;
    # the dataclass defaults alone would not show that the gin file sets anything).
    q = lambda p: gin.query_parameter(f"phatgoose_jax.methods.dfwe.{p}")
    if name == "dfwe":
      assert (q("DFWEConfig.budget"), q("DFWEConfig.finetune_steps")) == (100, 50)
      cfg = M.DFWEConfig()
      assert cfg.budget == 100 and cfg.finetune_steps == 50
    else:
      assert (q("LoraHubConfig.budget"), q("LoraHubConfig.bound"),
              q("LoraHubConfig.l1_weight"), q("LoraHubConfig.seed")) == (40, 1.5, 0.05, 42)
      cfg = M.LoraHubConfig()
      assert (cfg.budget, cfg.bound, cfg.l1_weight) == (40, 1.5, 0.05)
  finally:
    gin.clear_config()
