"""Expected t5x T5.1.1 tree, config inference and path helpers, checked against t5x's own manifest."""
import json
import os

import pytest

from phatgoose_jax.checkpoints import (CheckpointError, expected_param_shapes, flatten_params,
                                       infer_config, unflatten_params)
from phatgoose_jax.models.config import tiny_config

MANIFEST = os.path.join(os.path.dirname(__file__), "..", "testdata", "t5x_t5_1_1_tiny",
                        "params_manifest.json")


@pytest.fixture(scope="module")
def manifest():
  with open(MANIFEST) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def manifest_shapes(manifest):
  return {p["name"]: tuple(p["shape"]) for p in manifest["params"]}


def test_expected_shapes_equal_t5x_manifest(manifest, manifest_shapes):
  t5 = manifest["t5_config"]
  config = tiny_config(vocab_size=t5["vocab_size"], emb_dim=t5["emb_dim"], num_heads=t5["num_heads"],
                       num_encoder_layers=t5["num_encoder_layers"],
                       num_decoder_layers=t5["num_decoder_layers"], head_dim=t5["head_dim"],
                       mlp_dim=t5["mlp_dim"], mlp_activations=tuple(t5["mlp_activations"]))
  assert expected_param_shapes(config) == manifest_shapes
  assert len(manifest_shapes) == manifest["num_param_arrays"]


def test_tied_embedding_has_no_logits_dense():
  shapes = expected_param_shapes(tiny_config(logits_via_embedding=True))
  assert "decoder/logits_dense/kernel" not in shapes
  assert "decoder/logits_dense/kernel" in expected_param_shapes(tiny_config())


def test_mlp_kernel_names_follow_activation_count():
  cfg = tiny_config(mlp_activations=("relu",))
  shapes = expected_param_shapes(cfg)
  assert shapes["encoder/layers_0/mlp/wi/kernel"] == (cfg.emb_dim, cfg.mlp_dim)
  assert not any("wi_0" in k for k in shapes)
  shapes3 = expected_param_shapes(tiny_config(mlp_activations=("gelu", "linear", "relu")))
  assert {k.split("/")[3] for k in shapes3 if k.startswith("decoder/layers_2/mlp/wi")} == {
      "wi_0", "wi_1", "wi_2"}


def test_joined_kv_may_differ_from_emb_dim():
  cfg = tiny_config(emb_dim=13, num_heads=5, head_dim=3, relative_attention_num_buckets=7)
  shapes = expected_param_shapes(cfg)
  assert shapes["decoder/layers_1/encoder_decoder_attention/value/kernel"] == (13, 15)
  assert shapes["decoder/layers_1/encoder_decoder_attention/out/kernel"] == (15, 13)
  assert shapes["encoder/relpos_bias/rel_embedding"] == (5, 7)


def test_infer_config_recovers_manifest_dims(manifest, manifest_shapes):
  cfg = infer_config(manifest_shapes)
  for field, value in manifest["t5_config"].items():
    if field in ("dtype", "dropout_rate"):  # Not recoverable from shapes.
      continue
    got = getattr(cfg, field)
    assert (list(got) if isinstance(got, tuple) else got) == value, field


def test_infer_config_single_wi_and_tied():
  src = tiny_config(mlp_activations=("relu",), logits_via_embedding=True, num_decoder_layers=4,
                    emb_dim=13, num_heads=5, head_dim=3, mlp_dim=11)
  cfg = infer_config(expected_param_shapes(src), dtype="float32", dropout_rate=0.0)
  assert cfg == src


def test_infer_config_overrides_and_errors(manifest_shapes):
  cfg = infer_config(manifest_shapes, mlp_activations=("silu", "linear"), dropout_rate=0.0)
  assert cfg.mlp_activations == ("silu", "linear") and cfg.dropout_rate == 0.0
  broken = dict(manifest_shapes)
  del broken["encoder/relpos_bias/rel_embedding"]
  with pytest.raises(CheckpointError, match="encoder/relpos_bias/rel_embedding"):
    infer_config(broken)
  gap = {k: v for k, v in manifest_shapes.items() if not k.startswith("decoder/layers_1/")}
  with pytest.raises(CheckpointError, match="decoder layer indices"):
    infer_config(gap)
  flat3 = dict(manifest_shapes, **{"token_embedder/embedding": (3, 4, 5)})
  with pytest.raises(CheckpointError, match=r"token_embedder/embedding' has shape \(3, 4, 5\)"):
    infer_config(flat3)


def test_flatten_unflatten_round_trip():
  tree = {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
  flat = flatten_params(tree)
  assert flat == {"a/b/c": 1, "a/d": 2, "e": 3}
  assert unflatten_params(flat) == tree
  with pytest.raises(CheckpointError, match="a/b"):
    unflatten_params({"a/b": 1, "a/b/c": 2})
