"""Task-level MoE: m=1 equals the dense T5, expert selection, straight-through Gumbel, temperature
schedule, frozen routes and expert re-initialisation, both training stages, ARG, gin file."""
import dataclasses
import math
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax.methods import task_moe as tm
from phatgoose_jax.models import Transformer, tiny_config

GIN_DIR = pathlib.Path(__file__).parents[2] / "gin"
T5 = tiny_config(num_encoder_layers=1, num_decoder_layers=1)


def _batch(b=2):
  rng = np.random.RandomState(0)
  return {"encoder_input_tokens": rng.randint(1, 96, (b, 7)).astype(np.int32),
          "decoder_input_tokens": rng.randint(1, 96, (b, 5)).astype(np.int32),
          "decoder_target_tokens": rng.randint(1, 96, (b, 5)).astype(np.int32)}


def _routes(b, m, expert):
  return {"encoder": jax.nn.one_hot(jnp.full((b, 1), expert), m),
          "decoder": jax.nn.one_hot(jnp.full((b, 1), expert), m)}


def _logits(model, v, batch, routes):
  return model.apply(v, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                     batch["decoder_target_tokens"], enable_dropout=False,
                     site_inputs={"layer_routes": routes})


@pytest.fixture(scope="module")
def moe3():
  model = Transformer(T5, tm.make_task_moe_site_factory(tm.TaskMoEConfig(num_experts=3)))
  batch = _batch()
  init = jax.jit(lambda k: model.init({"params": k}, batch["encoder_input_tokens"],
                                      batch["decoder_input_tokens"],
                                      batch["decoder_target_tokens"], enable_dropout=False,
                                      site_inputs={"layer_routes": _routes(2, 3, 0)}))
  return model, dict(init(jax.random.PRNGKey(0))), batch


def test_m1_equals_dense_model():
  batch = _batch()
  model = Transformer(T5, tm.make_task_moe_site_factory(tm.TaskMoEConfig(num_experts=1)))
  v = jax.jit(lambda k: model.init(
      {"params": k}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], enable_dropout=False,
      site_inputs={"layer_routes": _routes(2, 1, 0)}))(jax.random.PRNGKey(0))
  dense = Transformer(T5)
  want = dense.apply({"params": v["params"]}, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                     enable_dropout=False)
  got = _logits(model, v, batch, _routes(2, 1, 0))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert v["adapters"]["decoder"]["layers_0"]["mlp"]["wo"]["experts_kernel"].shape == (1, 40, 24)


def test_routes_select_expert_copies(moe3):
  model, v, batch = moe3
  dense = Transformer(T5).apply({"params": v["params"]}, batch["encoder_input_tokens"],
                                batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                                enable_dropout=False)
  ek = v["adapters"]["encoder"]["layers_0"]["mlp"]["wi_0"]["experts_kernel"]
  np.testing.assert_array_equal(ek[2], v["params"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"])
  leaves, treedef = jax.tree.flatten(v["adapters"])  # perturb expert 1 everywhere
  pert = jax.tree.unflatten(treedef, [l.at[1].add(0.5) for l in leaves])
  vp = {**v, "adapters": pert}
  np.testing.assert_allclose(_logits(model, vp, batch, _routes(2, 3, 0)), dense, atol=1e-5)
  assert not np.allclose(_logits(model, vp, batch, _routes(2, 3, 1)), dense, atol=1e-3)
  # reinit_experts restores the copies of the base kernels.
  back = tm.reinit_experts(v["params"], pert)
  jax.tree.map(np.testing.assert_array_equal, back, v["adapters"])


def test_site_reads_its_own_layer_route():
  site = tm.TaskMoESite(features=5, kernel_axes=("mlp", "embed"), site="decoder/layers_1/mlp/wo",
                        num_experts=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 7))
  routes = {"decoder": jnp.stack([jax.nn.one_hot(jnp.array([0, 0]), 3),
                                  jax.nn.one_hot(jnp.array([2, 1]), 3)], axis=1)}  # [B, 2, m]
  v = site.init(jax.random.PRNGKey(1), x, layer_routes=routes)
  ek = jax.random.normal(jax.random.PRNGKey(2), (3, 7, 5))
  y = site.apply({**v, "adapters": {"experts_kernel": ek}}, x, layer_routes=routes)
  np.testing.assert_allclose(y[0], x[0] @ ek[2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[1], x[1] @ ek[1], rtol=1e-5, atol=1e-5)


def test_missing_routes_raise(moe3):
  model, v, batch = moe3
  with pytest.raises(tm.TaskMoEError, match="layer_routes"):
    model.apply(v, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                batch["decoder_target_tokens"], enable_dropout=False)
  with pytest.raises(tm.TaskMoEError, match="layer_routes"):
    _logits(model, v, batch, _routes(2, 2, 0))  # wrong m
  with pytest.raises(tm.TaskMoEError, match="num_experts"):
    tm.TaskMoEConfig(num_experts=0)
  with pytest.raises(tm.TaskMoEError, match="task_repr"):
    tm.TaskMoEConfig(task_repr="text")


def test_straight_through_forward_one_hot_gradient_to_logits():
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5))
  c = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5))
  y = tm.gumbel_softmax_st(jax.random.PRNGKey(2), logits, 0.7)
  assert set(np.unique(np.asarray(y))) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(y).sum(-1), 1.0)
  g = jax.grad(lambda l: jnp.sum(tm.gumbel_softmax_st(jax.random.PRNGKey(2), l, 0.7) * c))(logits)
  assert np.abs(np.asarray(g)).min(axis=-1).max() > 0 and np.all(np.isfinite(g))
  # Different keys give different samples (stochastic), argmax mode is the noise-free choice.
  ys = [tm.gumbel_softmax_st(jax.random.PRNGKey(k), jnp.zeros((64, 3)), 1.0) for k in range(2)]
  assert not np.array_equal(ys[0], ys[1])
  am = tm.routes_from_logits({"encoder": logits}, "argmax")["encoder"]
  np.testing.assert_array_equal(np.argmax(am, -1), np.argmax(logits, -1))


def test_temperature_schedule():
  steps = jnp.arange(0, 30000, 37)
  tau = np.asarray(tm.temperature_schedule(steps))
  assert tau[0] == pytest.approx(2.0) and np.all(np.diff(tau) <= 0)
  assert tau[-1] == pytest.approx(0.1) and tau.min() >= 0.1 - 1e-7
  assert float(tm.temperature_schedule(1000)) == pytest.approx(2.0 * math.exp(-0.3), rel=1e-6)


def test_average_relative_gain_by_hand():
  s, b = {"a": 0.6, "b": 0.3}, {"a": 0.5, "b": 0.4}
  assert tm.average_relative_gain(s, b) == pytest.approx((0.1 / 0.5 - 0.1 / 0.4) / 2)
  assert tm.average_relative_gain([0.6, 0.3], [0.5, 0.4], percent=True) == pytest.approx(-2.5)
  with pytest.raises(tm.TaskMoEError, match="task names"):
    tm.average_relative_gain({"a": 1.0}, {"b": 1.0})
  with pytest.raises(tm.TaskMoEError, match="baseline"):
    tm.average_relative_gain([1.0], [0.0])


def test_router_frozen_routes():
  cfg = tm.TaskMoEConfig(num_experts=3, num_tasks=4, task_dim=6, router_hidden_dim=5)
  router = tm.TaskMoERouter(cfg, 1, 2)
  rv = router.init(jax.random.PRNGKey(0), jnp.arange(4))
  logits = router.apply(rv, jnp.arange(4))
  assert logits["encoder"].shape == (4, 1, 3) and logits["decoder"].shape == (4, 2, 3)
  assert not np.allclose(logits["decoder"][:, 0], logits["decoder"][:, 1])  # one MLP per layer
  frozen = tm.task_routes(router, rv, jnp.arange(4))
  np.testing.assert_array_equal(np.argmax(frozen["decoder"], -1), np.argmax(logits["decoder"], -1))
  got = tm.fixed_routes(frozen, jnp.array([3, 1, 3]))
  np.testing.assert_array_equal(got["decoder"][1], frozen["decoder"][1])
  np.testing.assert_array_equal(got["encoder"][2], frozen["encoder"][3])


def test_two_stage_training(moe3):
  model, v, batch = moe3
  cfg = tm.TaskMoEConfig(num_experts=3, num_tasks=4, task_dim=6, router_hidden_dim=5,
                         learning_rate=1e-2, router_learning_rate=1e-1, clip_norm=None,
                         weight_decay=0.0)  # decoupled decay would move unselected experts too
  router = tm.TaskMoERouter(cfg, T5.num_encoder_layers, T5.num_decoder_layers)
  rv = router.init(jax.random.PRNGKey(1), jnp.arange(4))
  batch = {**batch, "task_ids": np.array([1, 2], np.int32)}
  tx = tm.task_moe_optimizer(cfg)
  # Stage 1: router and experts jointly.
  trainable = {"params": v["params"], "adapters": v["adapters"], "router": rv["params"]}
  step1 = tm.make_train_step(model, router, tx, cfg, stage=1)
  state = tx.init(trainable)
  new, state, loss = step1(trainable, state, None, batch, 0, jax.random.PRNGKey(2))
  assert np.isfinite(loss)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new["router"], trainable["router"])
  assert changed["hidden"]["kernel"] and changed["out_kernel"]
  # Stage 2 ('argmax'): frozen one-hot routes, experts re-initialised from the base kernels.
  cfg_a = dataclasses.replace(cfg, stage2_routes="argmax")
  frozen = tm.stage2_frozen(router, {"params": new["router"]}, cfg_a, jnp.arange(4))
  np.testing.assert_array_equal(frozen["encoder"],
                                tm.task_routes(router, {"params": new["router"]}, jnp.arange(4))[
                                    "encoder"])
  trainable2 = {"params": v["params"], "adapters": tm.reinit_experts(v["params"], new["adapters"])}
  moved = {}
  for mode, c, fz in (("argmax", cfg_a, frozen),
                      ("softmax", cfg, tm.stage2_frozen(router, {"params": new["router"]}, cfg,
                                                        jnp.arange(4)))):
    tx2 = tm.task_moe_optimizer(c)
    step2 = tm.make_train_step(model, router, tx2, c, stage=2)
    new2, _, loss2 = step2(trainable2, tx2.init(trainable2), fz, batch, 0, jax.random.PRNGKey(3))
    assert np.isfinite(loss2)
    ek_old = trainable2["adapters"]["encoder"]["layers_0"]["mlp"]["wo"]["experts_kernel"]
    ek_new = new2["adapters"]["encoder"]["layers_0"]["mlp"]["wo"]["experts_kernel"]
    moved[mode] = {e for e in range(3) if not np.allclose(ek_old[e], ek_new[e])}
    # the base kernel of an expert site is unused: no update, not even weight decay
    np.testing.assert_array_equal(new2["params"]["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                                  trainable2["params"]["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])
  # argmax: only the experts the frozen routes of tasks 1, 2 select at encoder layer 0 move;
  # softmax at tau2(0) = 300: every copy gets a share of the gradient.
  used = set(np.argmax(np.asarray(frozen["encoder"])[[1, 2], 0], -1).tolist())
  assert moved["argmax"] == used and moved["softmax"] == {0, 1, 2}, moved


def test_stage2_routes_anneal_from_uniform_to_softmax_at_tau_1():
  cfg = tm.TaskMoEConfig(num_experts=3)
  logits = {"encoder": jnp.asarray([[[2.0, 0.0, -1.0]], [[0.0, 3.0, 0.5]]])}  # [T=2, n=1, m=3]
  ids = jnp.asarray([1, 0, 1])
  for step, tau in ((0, 300.0), (10_000, 300.0 * math.exp(-1.0)), (10**6, 1.0)):
    got = tm.stage2_step_routes(logits, ids, step, cfg)["encoder"]
    want = jax.nn.softmax(logits["encoder"][ids] / tau, -1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(tm.stage2_eval_routes(logits, cfg)["encoder"],
                             jax.nn.softmax(logits["encoder"], -1), rtol=1e-6)
  hard = tm.stage2_eval_routes(logits, dataclasses.replace(cfg, stage2_routes="argmax"))
  np.testing.assert_array_equal(np.argmax(hard["encoder"], -1), [[0], [1]])


def test_optimizer_schedule_is_linear_warmup_then_decay():
  cfg = tm.TaskMoEConfig(learning_rate=1.0, clip_norm=None, weight_decay=0.0, warmup_ratio=0.1)
  tree = {"params": {"x": jnp.zeros(())}, "adapters": {}, "router": {}}
  tx = tm.task_moe_optimizer(cfg, total_steps=100)
  state = tx.init(tree)
  sizes = []
  for _ in range(100):
    upd, state = tx.update({"params": {"x": jnp.ones(())}, "adapters": {}, "router": {}}, state,
                           tree)
    sizes.append(-float(upd["params"]["x"]))  # Adam on a constant gradient: |update| = lr
  np.testing.assert_allclose(sizes[:11], np.arange(11) / 10, atol=1e-4)  # warm-up over 10 steps
  np.testing.assert_allclose(sizes[10:], (100 - np.arange(10, 100)) / 90, atol=1e-4)
  with pytest.raises(tm.TaskMoEError, match="total_steps"):
    tm.task_moe_optimizer(cfg, total_steps=0)


def test_gin_file_builds():
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_DIR))
    gin.parse_config_files_and_bindings([str(GIN_DIR / "routers" / "task_moe.gin")], [],
                                        finalize_config=True)
    cfg = tm.TaskMoEConfig()
    assert (cfg.num_experts, cfg.num_tasks, cfg.router_hidden_dim) == (3, 36, 64)
    assert (cfg.initial_tau, cfg.minimum_tau, cfg.anneal_rate) == (2.0, 0.1, 3e-4)
  finally:
    gin.clear_config()
