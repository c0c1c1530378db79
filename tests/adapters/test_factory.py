"""Adapter parameter trees, site enumeration, trainable masks and config validation."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax.models import Transformer, tiny_config
from phatgoose_jax.models import layers

R, E = 3, 5
CFG = tiny_config()


def _flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _sites_with(tree, leaf):
  """Site paths (parent paths) of every leaf called ``leaf``."""
  return {k.rsplit("/", 1)[0] for k in _flat(tree) if k.rsplit("/", 1)[1] == leaf}


def _shapes(adapter_config):
  model = ad.build_model(CFG, adapter_config)
  return jax.eval_shape(lambda: ad.init_variables(model, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def plain_vars():
  model = Transformer(CFG)
  return ad.init_variables(model, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def lora_vars():
  return ad.init_variables(ad.build_model(CFG, ad.AdapterConfig(rank=R)), jax.random.PRNGKey(0))


def test_params_unchanged_and_lora_at_every_site(plain_vars, lora_vars):
  plain, adapted = _flat(plain_vars["params"]), _flat(lora_vars["params"])
  assert len(plain) == 66
  assert set(adapted) == set(plain)
  # Same init rng -> the very same base parameters (adapters do not perturb the params stream).
  for k in plain:
    np.testing.assert_array_equal(adapted[k], plain[k])
  assert plain_vars["adapters"] == {}
  sites = ad.site_names(CFG)
  assert len(sites) == 2 * 7 + 3 * 11 == 47
  assert _sites_with(lora_vars["adapters"], "lora_a") == set(sites)
  flat_ad = _flat(lora_vars["adapters"])
  assert len(flat_ad) == 2 * 47  # lora_a and lora_b only
  axes = _flat(lora_vars["adapters_axes"])
  for site in sites:
    kernel = adapted[f"{site}/kernel"]
    a, b = flat_ad[f"{site}/lora_a"], flat_ad[f"{site}/lora_b"]
    assert a.shape == (kernel.shape[0], R) and b.shape == (R, kernel.shape[1])
    assert 0.002 < float(np.std(a)) < 0.03  # N(0, 0.01^2)
    assert not np.any(b)
    kaxes = _flat(lora_vars["params_axes"])[f"{site}/kernel_axes"].names
    assert axes[f"{site}/lora_a_axes"].names == (kaxes[0], "lora_rank")
    assert axes[f"{site}/lora_b_axes"].names == ("lora_rank", kaxes[1])
  # Nested layout of the contract.
  assert lora_vars["adapters"]["encoder"]["layers_0"]["attention"]["query"]["lora_a"].shape == (
      CFG.emb_dim, R)


def test_narrow_pattern_adapts_only_matching_sites():
  pattern = r"decoder/layers_\d+/encoder_decoder_attention/(key|value)"
  model = ad.build_model(CFG, ad.AdapterConfig(rank=R, site_pattern=pattern))
  v = jax.eval_shape(lambda: ad.init_variables(model, jax.random.PRNGKey(1)))
  expected = {f"decoder/layers_{i}/encoder_decoder_attention/{p}" for i in range(3)
              for p in ("key", "value")}
  assert _sites_with(v["adapters"], "lora_a") == expected
  assert set(ad.site_names(CFG, pattern)) == expected
  assert len(_flat(v["params"])) == 66


def test_site_names_match_the_sites_the_network_builds():
  built = []

  def recording(spec, name):
    built.append(spec.site)
    return layers.dense_site(spec, name)

  for cfg in (CFG, tiny_config(mlp_activations=("relu",), num_decoder_layers=1)):
    built.clear()
    jax.eval_shape(lambda: Transformer(cfg, recording).init(
        jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
        jnp.ones((1, 2), jnp.int32), enable_dropout=False))
    assert sorted(set(built)) == sorted(ad.site_names(cfg))
    assert len(built) == len(set(built))


def test_routed_and_gated_trees():
  # Shapes only (no compile): eval_shape of the initialiser.
  routed = _shapes(ad.AdapterConfig(mode="routed", rank=R, num_experts=E))
  site = "decoder/layers_2/mlp/wo"
  flat = _flat(routed["adapters"])
  assert flat[f"{site}/lora_a"].shape == (E, CFG.mlp_dim, R)
  assert flat[f"{site}/lora_b"].shape == (E, R, CFG.emb_dim)
  assert flat[f"{site}/gates"].shape == (E, CFG.mlp_dim)
  assert flat[f"{site}/scale"].shape == (E,)
  axes = _flat(routed["adapters_axes"])
  assert axes[f"{site}/lora_a_axes"].names == ("expert", "mlp", "lora_rank")
  assert axes[f"{site}/lora_b_axes"].names == ("expert", "lora_rank", "embed")
  assert axes[f"{site}/gates_axes"].names == ("expert", "mlp")
  assert axes[f"{site}/scale_axes"].names == ("expert",)
  assert len(_sites_with(routed["adapters"], "gates")) == 47

  gated = _shapes(ad.AdapterConfig(mode="gated_lora", rank=R))
  gflat = _flat(gated["adapters"])
  assert gflat[f"{site}/gate"].shape == (CFG.mlp_dim,)
  assert _flat(gated["adapters_axes"])[f"{site}/gate_axes"].names == ("mlp",)

  mask = _flat(ad.trainable_mask(gated["adapters"], "lora"))
  assert set(mask) == set(gflat)
  assert {k for k, m in mask.items() if m} == {k for k in gflat if k.endswith(("/lora_a",
                                                                               "/lora_b"))}
  gmask = _flat(ad.trainable_mask(gated["adapters"], "gate"))
  assert {k for k, m in gmask.items() if m} == {k for k in gflat if k.endswith("/gate")}
  assert sum(gmask.values()) == 47
  # The routed library's router vectors ('gates') are not the trainable gate.
  assert not any(_flat(ad.trainable_mask(routed["adapters"], "gate")).values())
  with pytest.raises(ValueError, match="what"):
    ad.trainable_mask(gated["adapters"], "router")


@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="moe"), "mode"),
    (dict(router="softmax"), "router"),
    (dict(rank=0), "rank"),
    (dict(site_pattern="(enc"), "site_pattern"),
    (dict(backend="fast"), "backend"),
    (dict(mode="routed", num_experts=2, top_k=3), "top_k"),
    (dict(arrow_temperature=0.0), "arrow_temperature"),
    (dict(scale=float("nan")), "scale"),
    (dict(scale=True), "scale"),
    (dict(init_std=True), "init_std"),
])
def test_bad_config_raises(kwargs, field):
  with pytest.raises(ValueError, match=field):
    ad.AdapterConfig(**kwargs)


def test_equal_configs_give_equal_hashable_models():
  m1 = ad.build_model(CFG, ad.AdapterConfig(mode="routed", num_experts=3))
  m2 = ad.build_model(CFG, ad.AdapterConfig(mode="routed", num_experts=3))
  m3 = ad.build_model(CFG, ad.AdapterConfig(mode="routed", num_experts=4))
  assert m1 == m2 and hash(m1) == hash(m2)
  assert m1 != m3
  assert ad.site_token_side("decoder/layers_1/encoder_decoder_attention/value") == "encoder"
  assert ad.site_token_side("decoder/layers_1/encoder_decoder_attention/query") == "decoder"
  assert ad.site_token_side("encoder/layers_0/mlp/wo") == "encoder"
