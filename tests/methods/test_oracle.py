"""Oracle / Best-individual on a hand table; Merged Experts gives the single-LoRA model that equals
merging.merge_library; merged.gin builds."""
import pathlib

import gin
import jax
import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax import merging
from phatgoose_jax.library import ExpertLibrary
from phatgoose_jax.library.format import site_shapes
from phatgoose_jax.methods import oracle as orc
from phatgoose_jax.models import tiny_config

GIN_DIR = pathlib.Path(__file__).parents[2] / "gin"

# rows: experts, columns: held-out tasks (accuracy %)
TABLE = {
    "a": {"rte": 60.0, "copa": 50.0, "wic": 55.0},
    "b": {"rte": 52.0, "copa": 80.0, "wic": 50.0},
    "c": {"rte": 58.0, "copa": 70.0, "wic": 56.0},
}


def test_oracle_picks_best_expert_per_task():
  res = orc.oracle(TABLE)
  assert res.experts == {"copa": "b", "rte": "a", "wic": "c"}
  assert res.scores == {"copa": 80.0, "rte": 60.0, "wic": 56.0}
  assert res.average == pytest.approx((80 + 60 + 56) / 3)


def test_best_individual_is_best_average():
  res = orc.best_individual(TABLE)
  # means: a 55.0, b 60.67, c 61.33 -> c (not the per-task winner of any task but copa's runner-up)
  assert res.expert == "c"
  assert res.average == pytest.approx(184 / 3)
  assert res.averages["b"] == pytest.approx(182 / 3)
  assert res.scores == TABLE["c"]
  sub = orc.best_individual(TABLE, tasks=["copa"])
  assert sub.expert == "b"


def test_ties_first_and_table_helpers_and_errors():
  tied = {"x": {"t": 1.0}, "y": {"t": 1.0}}
  assert orc.oracle(tied).experts == {"t": "x"} and orc.best_individual(tied).expert == "x"
  table = orc.score_table(np.array([[1.0, 2.0], [3.0, 0.0]]), ["p", "q"], ["t1", "t2"])
  assert orc.oracle(table).experts == {"t1": "q", "t2": "p"}
  with pytest.raises(orc.OracleError, match=r"scores\['a'\] has no score.*rte"):
    orc.oracle({"a": {"wic": 1.0}, "b": {"rte": 2.0}})
  with pytest.raises(orc.OracleError, match="not finite"):
    orc.best_individual({"a": {"t": float("nan")}})
  with pytest.raises(orc.OracleError, match="matrix shape"):
    orc.score_table(np.zeros((2, 2)), ["p"], ["t"])


@pytest.mark.parametrize("method,density", [("uniform_factor", None), ("ties", 0.5),
                                            ("delta_average", None)])
def test_merged_adapters_match_merge_library(tmp_path, method, density):
  cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1)
  sites = ["encoder/layers_0/mlp/wo", "decoder/layers_0/self_attention/value"]
  shapes = site_shapes(cfg)
  lib = ExpertLibrary.create(str(tmp_path / "lib"), "sha256:" + "1" * 64, cfg)
  rng = np.random.default_rng(0)
  for i in range(3):
    lib.add(f"e{i}", {s: {"lora_a": rng.normal(size=(shapes[s][0], 2)).astype(np.float32),
                          "lora_b": rng.normal(size=(2, shapes[s][1])).astype(np.float32)}
                      for s in sites}, 0.5)
  tree, acfg = orc.merged_library_adapters(lib, config=orc.MergeConfig(method, density))
  stacked = lib.stack(vectors=None)
  weights = None if method != "ties" else np.ones(3)
  want = merging.merge_library({s: {k: v for k, v in e.items() if k != "scale"}
                                for s, e in stacked.items()}, 0.5, weights, method,
                               density=density)
  for s in sites:
    node = tree
    for part in s.split("/"):
      node = node[part]
    got = np.asarray(node["lora_a"]) @ np.asarray(node["lora_b"]) * acfg.scale
    ref = np.asarray(want[s]["lora_a"]) @ np.asarray(want[s]["lora_b"]) * want[s]["scale"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  if method == "uniform_factor":  # official average_lora_weights: A and B averaged separately
    a = stacked[sites[0]]["lora_a"].mean(0) * 0.5
    b = stacked[sites[0]]["lora_b"].mean(0)
    node = tree["encoder"]["layers_0"]["mlp"]["wo"]
    np.testing.assert_allclose(np.asarray(node["lora_a"]) @ np.asarray(node["lora_b"]), a @ b,
                               rtol=1e-5, atol=1e-5)
  # the returned config builds a model that takes the tree
  model = ad.build_model(cfg, acfg)
  params = ad.init_variables(ad.build_model(cfg), jax.random.PRNGKey(0))["params"]
  tokens = np.ones((1, 3), np.int32)
  out = model.apply({"params": params, "adapters": tree}, tokens, tokens, tokens)
  assert out.shape == (1, 3, cfg.vocab_size)


def test_merge_config_and_gin():
  import phatgoose_jax.methods  # noqa: F401
  with pytest.raises(orc.OracleError, match="MergeConfig.method"):
    orc.MergeConfig(method="mean")
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(GIN_DIR / "routers" / "merged.gin")],
                                        ["MERGE_METHOD = 'ties'", "MERGE_DENSITY = 0.2"])
    cfg = orc.MergeConfig()
    assert (cfg.method, cfg.density) == ("ties", 0.2)
  finally:
    gin.clear_config()
