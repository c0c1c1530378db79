"""Average Activation: library prototypes equal masked means of the site inputs captured from a
manual forward with the expert active; routing with them equals phatgoose_route; gin builds."""
import pathlib

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax import routing as rt
from phatgoose_jax.library import ExpertLibrary, LibraryError, to_adapters_tree
from phatgoose_jax.library.format import site_shapes
from phatgoose_jax.methods import average_activation as aa
from phatgoose_jax.models import DenseSite, tiny_config

GIN_DIR = pathlib.Path(__file__).parents[2] / "gin"
CFG = tiny_config(num_encoder_layers=1, num_decoder_layers=2)
PATTERN = (r"encoder/layers_0/(attention/query|mlp/wo)"
           r"|decoder/layers_\d/(encoder_decoder_attention/(key|query)|mlp/wi_0)")
SITES = ad.site_names(CFG, PATTERN)
R = 2


def _lora(seed):
  rng = np.random.default_rng(seed)
  shapes = site_shapes(CFG)
  return {s: {"lora_a": rng.normal(0, 0.5, (shapes[s][0], R)).astype(np.float32),
              "lora_b": rng.normal(0, 0.5, (R, shapes[s][1])).astype(np.float32)} for s in SITES}


def _batch(seed, b, lens):
  rng = np.random.default_rng(seed)
  enc = np.zeros((b, 6), np.int32)
  tgt = np.zeros((b, 4), np.int32)
  for i in range(b):
    enc[i, :lens[i]] = rng.integers(2, 96, lens[i])
    tgt[i, :1 + i % 4] = rng.integers(2, 96, 1 + i % 4)
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.int32)}


def _capture(model, variables, batch, **kw):
  """Site inputs x [B, L, D] of every DenseSite, via a method interceptor (no sowing)."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, DenseSite):
      seen[context.module.site] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                batch["decoder_target_tokens"], **kw)
  return seen


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  params = ad.init_variables(ad.build_model(CFG), jax.random.PRNGKey(0))["params"]
  lib = ExpertLibrary.create(str(tmp_path_factory.mktemp("lib")), params, CFG)
  lib.add("e0", _lora(0), 0.5)
  lib.add("e1", _lora(1), 0.25)
  batches = {"e0": [_batch(10, 3, [6, 2, 4]), _batch(11, 2, [3, 5])],
             "e1": [_batch(12, 3, [1, 6, 3])]}
  config = aa.AverageActivationConfig(max_examples=4)
  done = aa.compute_average_activation_vectors(lib, params, batches, config=config)
  return params, lib, batches, done


def _manual(params, lib, name, batches, max_examples):
  expert = lib.load(name)
  model = ad.build_model(CFG, ad.AdapterConfig(mode="lora", site_pattern=PATTERN, rank=R,
                                               scale=expert.scale))
  variables = {"params": params, "adapters": to_adapters_tree(expert.lora)}
  rows = {s: [] for s in SITES}
  for batch in batches:
    xs = _capture(model, variables, batch)
    enc_mask = (batch["encoder_input_tokens"] > 0).astype(np.float64)
    dec_mask = batch["decoder_loss_weights"].astype(np.float64)
    for s in SITES:
      m = enc_mask if ad.site_token_side(s) == "encoder" else dec_mask  # [B, L]
      per_ex = (xs[s] * m[..., None]).sum(1) / (m.sum(1)[:, None] + 1e-6)  # [B, D]
      rows[s].extend(per_ex)
  return {s: np.mean(rows[s][:max_examples], axis=0) for s in SITES}


def test_prototypes_equal_masked_means_of_captured_inputs(setup):
  params, lib, batches, done = setup
  for name in ("e0", "e1"):
    want = _manual(params, lib, name, batches[name], 4)
    stored = lib.load(name).vectors["average_activation"]
    for s in SITES:
      np.testing.assert_allclose(stored[s], want[s], rtol=1e-4, atol=1e-5, err_msg=s)
      np.testing.assert_allclose(done[name][s], want[s], rtol=1e-4, atol=1e-5)
  # collected WITH the expert active: a later site differs from the base model's activations
  base = aa.site_input_means(aa.collecting_model(CFG, SITES, R, 0.5), params,
                             to_adapters_tree({s: {k: 0 * v for k, v in ab.items()}
                                               for s, ab in lib.load("e0").lora.items()}),
                             batches["e0"], 4)
  late = "decoder/layers_1/mlp/wi_0"
  assert not np.allclose(base[late], lib.load("e0").vectors["average_activation"][late],
                         atol=1e-4)
  assert lib.metadata("e0")["vector_provenance"]["average_activation"]["max_examples"] == 4


def test_routing_with_prototypes_equals_phatgoose_route(setup):
  params, lib, batches, _ = setup
  stacked = lib.stack(vectors="average_activation")
  model = ad.build_model(CFG, ad.AdapterConfig(mode="routed", router="average_activation",
                                               site_pattern=PATTERN, num_experts=2, rank=R,
                                               top_k=1, trace=True))
  variables = {"params": params, "adapters": to_adapters_tree(stacked)}
  batch = batches["e1"][0]
  xs = _capture(model, variables, batch)
  _, state = model.apply(variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                         batch["decoder_target_tokens"], mutable=["intermediates"])
  chosen = set()
  for s in SITES:
    node = state["intermediates"]
    for part in s.split("/"):
      node = node[part]
    indices, weights = node["routing"][0]
    want = rt.phatgoose_route(xs[s], stacked[s]["gates"], 1)
    np.testing.assert_array_equal(indices, want.indices)
    np.testing.assert_allclose(weights, want.weights, rtol=1e-6)
    chosen |= set(np.unique(np.asarray(indices)).tolist())
  assert chosen == {0, 1}  # both experts are used somewhere: the comparison is not trivial


def test_bad_inputs(setup):
  params, lib, batches, _ = setup
  with pytest.raises(LibraryError, match="no training batches"):
    aa.compute_average_activation_vectors(lib, params, {"e0": batches["e0"]})
  with pytest.raises(aa.AverageActivationError, match="max_examples"):
    aa.AverageActivationConfig(max_examples=0)
  with pytest.raises(aa.AverageActivationError, match="lacks features"):
    aa.site_input_means(ad.build_model(CFG), params, {}, [{"encoder_input_tokens": 1}])


def test_gin_file_builds():
  import phatgoose_jax.methods  # noqa: F401
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(GIN_DIR / "routers" / "average_activation_build.gin")], [])
    cfg = aa.AverageActivationConfig()
    assert cfg.max_examples == 1000 and cfg.kind == "average_activation"
    assert ad.AdapterConfig(num_experts=3).router == "average_activation"
  finally:
    gin.clear_config()


def test_sample_rows_is_a_seeded_uniform_reservoir():
  """build_library_vectors' row sample: deterministic per seed, distinct rows, all rows (in
  order) when there are fewer than k, and every row equally likely."""
  from phatgoose_jax.methods.average_activation import sample_rows
  stream = lambda: ({"x": np.arange(s, s + 4)[:, None]} for s in range(0, 20, 4))  # 20 rows
  a = [int(r["x"][0]) for r in sample_rows(stream(), 5, seed=42)]
  b = [int(r["x"][0]) for r in sample_rows(stream(), 5, seed=42)]
  assert a == b and len(set(a)) == 5 and all(0 <= v < 20 for v in a)
  assert a != [int(r["x"][0]) for r in sample_rows(stream(), 5, seed=7)]
  assert [int(r["x"][0]) for r in sample_rows(stream(), 50, seed=0)] == list(range(20))
  counts = np.zeros(20)
  for seed in range(2000):
    for r in sample_rows(stream(), 5, seed=seed):
      counts[int(r["x"][0])] += 1
  np.testing.assert_allclose(counts / 2000, 0.25, atol=0.05)  # k / n for every row
