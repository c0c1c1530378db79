"""Stacking experts into the routed-site arrays; zero-padding of ranks; adapters tree layout."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from phatgoose_jax.library import (ExpertLibrary, LibraryError, lora_from_adapters_tree,
                                   place_stacked, to_adapters_tree)
from phatgoose_jax.library import site_shapes
from phatgoose_jax.models.config import tiny_config

CONFIG = tiny_config(emb_dim=13, num_heads=3, head_dim=5, mlp_dim=7, num_encoder_layers=1,
                     num_decoder_layers=1)
FP = "sha256:" + "ab" * 32
SHAPES = site_shapes(CONFIG)


def make_lora(seed, rank=3):
  rng = np.random.default_rng(seed)
  return {s: {"lora_a": rng.normal(size=(d, rank)).astype(np.float32),
              "lora_b": rng.normal(size=(rank, f)).astype(np.float32)}
          for s, (d, f) in SHAPES.items()}


def make_vectors(seed):
  rng = np.random.default_rng(seed)
  return {s: rng.normal(size=(d,)).astype(np.float32) for s, (d, _) in SHAPES.items()}


@pytest.fixture
def lib(tmp_path):
  lib = ExpertLibrary.create(str(tmp_path / "lib"), FP, CONFIG)
  lib.add("e0", make_lora(0, rank=3), 0.5, gates=make_vectors(100))
  lib.add("e1", make_lora(1, rank=2), 2.0, gates=make_vectors(101))
  lib.add("e2", make_lora(2, rank=5), 1 / 5, gates=make_vectors(102))
  return lib


def test_stack_shapes_values_and_order(lib):
  stacked = lib.stack(["e2", "e0", "e1"])
  assert list(stacked) == list(SHAPES)
  loras = {"e0": make_lora(0, rank=3), "e1": make_lora(1, rank=2), "e2": make_lora(2, rank=5)}
  gates = {"e0": make_vectors(100), "e1": make_vectors(101), "e2": make_vectors(102)}
  for site, (d, f) in SHAPES.items():
    s = stacked[site]
    assert s["lora_a"].shape == (3, d, 5) and s["lora_b"].shape == (3, 5, f)
    assert s["gates"].shape == (3, d) and s["scale"].dtype == np.float32
    np.testing.assert_array_equal(s["scale"], np.float32([1 / 5, 0.5, 2.0]))
    for e, name in enumerate(["e2", "e0", "e1"]):
      r = loras[name][site]["lora_a"].shape[1]
      np.testing.assert_array_equal(s["lora_a"][e, :, :r], loras[name][site]["lora_a"])
      np.testing.assert_array_equal(s["lora_b"][e, :r], loras[name][site]["lora_b"])
      assert not s["lora_a"][e, :, r:].any() and not s["lora_b"][e, r:].any()
      np.testing.assert_array_equal(s["gates"][e], gates[name][site])
  default = lib.stack()
  np.testing.assert_array_equal(default[list(SHAPES)[0]]["gates"][0], gates["e0"][list(SHAPES)[0]])


def test_rank_zero_padding_is_exact(lib):
  stacked = lib.stack(vectors=None)
  x = np.random.default_rng(9).normal(size=(4, 13)).astype(np.float32)  # [T, D]
  site = "encoder/layers_0/mlp/wi_1"
  for e, name in enumerate(lib.names()):
    expert = lib.load(name)
    want = (x @ expert.lora[site]["lora_a"]) @ expert.lora[site]["lora_b"]  # unpadded
    got = (x @ stacked[site]["lora_a"][e]) @ stacked[site]["lora_b"][e]
    np.testing.assert_array_equal(got, want)
  assert "gates" not in stacked[site]


def test_stack_dtype_and_sites_subset(lib):
  sites = ["decoder/layers_0/mlp/wo", "encoder/layers_0/attention/key"]
  stacked = lib.stack(dtype="bfloat16", sites=sites)
  assert list(stacked) == sites
  assert stacked[sites[0]]["lora_a"].dtype.name == "bfloat16"
  assert stacked[sites[0]]["gates"].dtype.name == "bfloat16"
  assert stacked[sites[0]]["scale"].dtype == np.float32
  with pytest.raises(LibraryError, match="not a site of the library"):
    lib.stack(sites=["decoder/layers_3/mlp/wo"])


def test_stack_errors(tmp_path, lib):
  empty = ExpertLibrary.create(str(tmp_path / "empty"), FP, CONFIG)
  with pytest.raises(LibraryError, match="no experts to stack"):
    empty.stack()
  with pytest.raises(LibraryError, match="no experts to stack"):
    lib.stack(names=[])
  lib.add("nogate", make_lora(3), 1.0)
  with pytest.raises(LibraryError, match=r"\['nogate'\] have no 'gate' vectors.*gate run's "
                     "MODEL_DIR"):
    lib.stack()
  with pytest.raises(LibraryError, match="'prototype_arrow'"):
    lib.stack(["e0"], vectors="prototype_arrow")
  with pytest.raises(LibraryError, match="'missing' is not in the library"):
    lib.stack(["e0", "missing"])
  with pytest.raises(LibraryError, match="duplicates"):
    lib.stack(["e0", "e0"])


def test_to_adapters_tree_layout(lib):
  stacked = lib.stack(["e0", "e1"])
  tree = to_adapters_tree(stacked)
  leaf = tree["encoder"]["layers_0"]["attention"]["query"]
  assert set(leaf) == {"lora_a", "lora_b", "gates", "scale"}
  assert leaf["lora_a"] is stacked["encoder/layers_0/attention/query"]["lora_a"]
  assert set(tree["decoder"]["layers_0"]) == {"self_attention", "encoder_decoder_attention", "mlp"}
  n_leaves = len(jax.tree_util.tree_leaves(tree))
  assert n_leaves == 4 * len(SHAPES)


def test_lora_from_adapters_tree_round_trip(lib):
  lora = make_lora(7)
  gates = make_vectors(8)
  tree = to_adapters_tree({s: {**lora[s], "gate": gates[s]} for s in lora})
  got_lora, got_gates = lora_from_adapters_tree(tree)
  assert list(got_lora) == list(lora)
  lib.add("from_tree", got_lora, 1.0, gates=got_gates)
  e = lib.load("from_tree")
  site = "decoder/layers_0/encoder_decoder_attention/value"
  np.testing.assert_array_equal(e.lora[site]["lora_b"], lora[site]["lora_b"])
  np.testing.assert_array_equal(e.vectors["gate"][site], gates[site])


def test_place_stacked_on_expert_axis(lib):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  placed = lib.stack(["e0", "e1"], mesh=mesh, expert_axis="data")
  arr = placed["encoder/layers_0/attention/query"]["lora_a"]
  assert isinstance(arr, jax.Array) and arr.sharding.spec[0] == "data"
  plain = lib.stack(["e0", "e1"])["encoder/layers_0/attention/query"]["lora_a"]
  np.testing.assert_array_equal(np.asarray(arr), plain)
  with pytest.raises(LibraryError, match="not an axis of the mesh"):
    place_stacked(lib.stack(["e0"]), mesh, "expert")
