"""Routed library sites: reduction to single experts, router wiring, cached decoding, collection."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax import routing as rt
from phatgoose_jax.models import greedy_decode, init_cache, tiny_config

R, E, K = 3, 5, 2
CFG = tiny_config()
ENC = jnp.array([[5, 7, 9, 3, 0], [4, 8, 2, 0, 0]], jnp.int32)
DEC_IN = jnp.array([[0, 6, 7, 3], [0, 9, 5, 2]], jnp.int32)
DEC_TGT = jnp.array([[6, 7, 3, 1], [9, 5, 2, 0]], jnp.int32)


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree), sep="/")


def _random_experts(lora_adapters, n, seed):
  """``n`` random single-expert adapter trees shaped like ``lora_adapters``."""
  rng = np.random.default_rng(seed)
  flat = _flat(lora_adapters)
  out = []
  for _ in range(n):
    out.append(traverse_util.unflatten_dict(
        {k: jnp.asarray(rng.normal(size=v.shape) * 0.4, jnp.float32) for k, v in flat.items()},
        sep="/"))
  return out


def _stack(experts, seed, scale=1.0 / R):
  """Routed ``adapters`` tree from single-expert trees (+ random router vectors)."""
  rng = np.random.default_rng(seed)
  flats = [_flat(e) for e in experts]
  routed = {}
  for key in flats[0]:
    site, leaf = key.rsplit("/", 1)
    routed[key] = jnp.stack([f[key] for f in flats])
    if leaf == "lora_a":
      d = flats[0][key].shape[0]
      routed[f"{site}/gates"] = jnp.asarray(rng.normal(size=(len(experts), d)), jnp.float32)
      routed[f"{site}/scale"] = jnp.full((len(experts),), scale, jnp.float32)
  return traverse_util.unflatten_dict(routed, sep="/")


def _routed_model(**kw):
  return ad.build_model(CFG, ad.AdapterConfig(mode="routed", rank=R, **kw))


def _logits(model, variables, **kw):
  return model.apply(variables, ENC, DEC_IN, DEC_TGT, enable_dropout=False, **kw)


@pytest.fixture(scope="module")
def lora():
  model = ad.build_model(CFG, ad.AdapterConfig(rank=R))
  v = ad.init_variables(model, jax.random.PRNGKey(0))
  experts = _random_experts(v["adapters"], 3, seed=1)
  return model, v["params"], experts


def test_single_expert_routed_equals_lora(lora):
  model, params, experts = lora
  # PHATGOOSE's top-k renormalisation divides by (sum + 1e-6) (official code), so the lone
  # expert's weight is 1 / (1 + 1e-6); fold it into B (the network amplifies a 1e-6 change).
  weight = 1.0 / (1.0 + rt.PHATGOOSE_TOPK_EPS)
  expert = {k: v * weight if k.endswith("lora_b") else v for k, v in _flat(experts[0]).items()}
  expected = _logits(model, {"params": params,
                             "adapters": traverse_util.unflatten_dict(expert, sep="/")})
  routed = _routed_model(num_experts=1, top_k=1)
  got = _logits(routed, {"params": params, "adapters": _stack(experts[:1], seed=2)})
  base = _logits(ad.build_model(CFG, ad.AdapterConfig(mode="none")), {"params": params})
  assert np.max(np.abs(np.asarray(expected) - np.asarray(base))) > 1e-2
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_uniform_over_identical_experts_equals_one(lora):
  model, params, experts = lora
  expected = _logits(model, {"params": params, "adapters": experts[1]})
  routed = _routed_model(num_experts=3, router="uniform")
  got = _logits(routed, {"params": params, "adapters": _stack([experts[1]] * 3, seed=3)})
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_example_weights_one_hot_picks_each_examples_expert(lora):
  model, params, experts = lora
  routed = _routed_model(num_experts=3, router="example_weights")
  variables = {"params": params, "adapters": _stack(experts, seed=4)}
  weights = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], jnp.float32)
  got = np.asarray(_logits(routed, variables, site_inputs={"expert_weights": weights}))
  for row, e in ((0, 1), (1, 2)):
    expected = np.asarray(_logits(model, {"params": params, "adapters": experts[e]}))[row]
    np.testing.assert_allclose(got[row], expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="expert_weights"):
    _logits(routed, variables)
  with pytest.raises(ValueError, match="expert_weights"):
    _logits(routed, variables, site_inputs={"expert_weights": weights[:, :2]})


def _np_ln(v):
  mu = v.mean(-1, keepdims=True)
  return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5)


def _np_softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _np_route(router, x, g, k, temperature):
  """Independent numpy routers: (indices [..., K], weights [..., K])."""
  d = x.shape[-1]
  if router in ("phatgoose", "average_activation", "arrow_phatgoose"):
    if router == "arrow_phatgoose":
      logits = np.abs(x @ g.T / 10.0) / np.sqrt(d)
    else:
      logits = _np_ln(x) @ _np_ln(g).T / np.sqrt(d)
    p = _np_softmax(logits)
    idx = np.argsort(-p, axis=-1)[..., :k]
    top = np.take_along_axis(p, idx, -1)
    return idx, top / (top.sum(-1, keepdims=True) + 1e-6)
  logits = np.abs(x @ g.T) / temperature  # arrow
  idx = np.argsort(-logits, axis=-1)[..., :k]
  return idx, _np_softmax(np.take_along_axis(logits, idx, -1))


@pytest.mark.parametrize("router, temperature", [
    ("phatgoose", None), ("average_activation", None), ("arrow", 2.0), ("arrow_phatgoose", None)])
def test_site_routes_every_token_with_its_router(router, temperature):
  d, f = 13, 7
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 6, d)) * 2.0 + 0.3
  a = rng.normal(size=(E, d, R))
  b = rng.normal(size=(E, R, f))
  g = rng.normal(size=(E, d))
  s = rng.uniform(0.2, 1.0, size=(E,))
  site = ad.RoutedLoraSite(features=f, kernel_axes=("embed", "mlp"), site="s", rank=R,
                           num_experts=E, top_k=K, router=router, arrow_temperature=temperature,
                           trace=True)
  xj = jnp.asarray(x, jnp.float32)
  v0 = site.init({"params": jax.random.PRNGKey(0)}, xj)
  variables = {"params": v0["params"], "adapters": {
      "lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32),
      "gates": jnp.asarray(g, jnp.float32), "scale": jnp.asarray(s, jnp.float32)}}
  y, state = site.apply(variables, xj, mutable=["intermediates"])
  idx, w = _np_route(router, x, g, K, temperature)
  expected = x @ np.asarray(v0["params"]["kernel"], np.float64)
  for k in range(K):
    e = idx[..., k]  # [2, 6]
    lora = np.einsum("bld,bldr,blrf->blf", x, a[e], b[e])
    expected = expected + (w[..., k] * s[e])[..., None] * lora
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  got_idx, got_w = state["intermediates"]["routing"][0]
  np.testing.assert_array_equal(got_idx, idx)
  np.testing.assert_allclose(got_w, w, rtol=1e-5, atol=1e-6)
  assert len({tuple(r) for r in idx.reshape(-1, K)}) > 1  # tokens differ in their choice


@pytest.fixture(scope="module")
def routed_library(lora):
  _, params, _ = lora
  lora_model = ad.build_model(CFG, ad.AdapterConfig(rank=R))
  shapes = ad.init_variables(lora_model, jax.random.PRNGKey(0))["adapters"]
  experts = _random_experts(shapes, E, seed=7)
  return params, _stack(experts, seed=8, scale=1.0)


def test_each_site_routes_its_own_tokens(routed_library):
  params, library = routed_library
  model = _routed_model(num_experts=E, top_k=K, trace=True)
  _, state = _logits(model, {"params": params, "adapters": library}, mutable=["intermediates"])
  traces = {k.rsplit("/", 1)[0]: v[0] for k, v in _flat(state["intermediates"]).items()}
  assert set(traces) == set(ad.site_names(CFG))
  for site, (idx, w) in traces.items():
    tokens = ENC.shape[1] if ad.site_token_side(site) == "encoder" else DEC_IN.shape[1]
    assert idx.shape == w.shape == (2, tokens, K), site
    assert w.dtype == jnp.float32


def test_greedy_decode_matches_teacher_forced_routing(routed_library):
  params, library = routed_library
  model = _routed_model(num_experts=E, top_k=K)
  variables = {"params": params, "adapters": library}
  steps = 5
  tokens = greedy_decode(model, variables, ENC, steps, eos_id=-1)  # [B, T]
  dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tokens[:, :-1]], axis=1)
  forced = model.apply(variables, ENC, dec_in, jnp.ones_like(tokens), enable_dropout=False)
  np.testing.assert_array_equal(tokens, jnp.argmax(forced, -1))
  # Step-by-step cached logits equal teacher-forced ones (cross k/v routed once on encoder tokens).
  encoded = model.apply(variables, ENC, enable_dropout=False, method=model.encode)
  cache = init_cache(model, variables, encoded, ENC, steps)
  for i in range(steps):
    logits, state = model.apply({**variables, "cache": cache}, encoded, ENC, dec_in[:, i:i + 1],
                                dec_in[:, i:i + 1], enable_dropout=False, decode=True,
                                max_decode_length=steps, mutable=["cache"], method=model.decode)
    cache = state["cache"]
    np.testing.assert_allclose(logits[:, 0], forced[:, i], rtol=1e-5, atol=1e-5)


def test_collect_site_input_means(lora):
  _, params, _ = lora
  model = ad.build_model(CFG, ad.AdapterConfig(mode="none", collect_inputs=True))
  enc_mask = (ENC > 0).astype(jnp.float32)
  dec_mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
  variables = {"params": params}

  def means(site_inputs):
    _, state = _logits(model, variables, site_inputs=site_inputs, mutable=["intermediates"])
    return {k.rsplit("/", 1)[0]: np.asarray(v[0]) for k, v in _flat(state["intermediates"]).items()}

  got = means({"encoder_token_mask": enc_mask, "decoder_token_mask": dec_mask})
  assert set(got) == set(ad.site_names(CFG))
  # Cross-attention key/value see the encoder output: its masked per-example mean.
  encoded = np.asarray(model.apply(variables, ENC, enable_dropout=False, method=model.encode))
  m = np.asarray(enc_mask)[..., None]
  expected = (encoded * m).sum(1) / m.sum(1)
  for p in ("key", "value"):
    np.testing.assert_allclose(got[f"decoder/layers_1/encoder_decoder_attention/{p}"], expected,
                               rtol=1e-5, atol=1e-5)
  # Decoder self-attention of layer 0 sees RMSNorm(embed(decoder tokens)).
  emb = np.asarray(params["token_embedder"]["embedding"])[np.asarray(DEC_IN)]
  ln = np.asarray(params["decoder"]["layers_0"]["pre_self_attention_layer_norm"]["scale"])
  h = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + 1e-6) * ln
  dm = np.asarray(dec_mask)[..., None]
  np.testing.assert_allclose(got["decoder/layers_0/self_attention/query"],
                             (h * dm).sum(1) / dm.sum(1), rtol=1e-5, atol=1e-5)
  # Without a decoder mask: plain mean; 'token_mask' is the encoder mask's alias.
  got2 = means({"token_mask": enc_mask})
  np.testing.assert_allclose(got2["decoder/layers_0/self_attention/query"], h.mean(1),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got2["encoder/layers_1/mlp/wi_0"], got["encoder/layers_1/mlp/wi_0"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="encoder_token_mask"):
    means({"encoder_token_mask": enc_mask[:, :3]})


def test_top_k_above_the_loaded_library_names_the_site_and_field(lora):
  model_lora, params, experts = lora
  model = _routed_model(num_experts=3, top_k=3, router="phatgoose")
  variables = {"params": params, "adapters": _stack(experts[:2], seed=4)}  # only 2 experts loaded
  with pytest.raises(ValueError, match=r"site '.*': AdapterConfig.top_k=3 exceeds the 2 experts"):
    _logits(model, variables)
