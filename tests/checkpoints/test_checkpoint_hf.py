"""HF T5 folders: name/layout mapping checked against tensors read independently with safetensors."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from phatgoose_jax.checkpoints import CheckpointError, detect_format, load_checkpoint
from phatgoose_jax.checkpoints.shapes import flatten_params

HF_MODEL = os.path.join(os.path.dirname(__file__), "..", "testdata", "hf_t5_1_1_tiny", "model")
MANIFEST = os.path.join(os.path.dirname(__file__), "..", "testdata", "t5x_t5_1_1_tiny",
                        "params_manifest.json")


@pytest.fixture(scope="module")
def hf_tensors():
  return load_file(os.path.join(HF_MODEL, "model.safetensors"))


@pytest.fixture(scope="module")
def loaded():
  return load_checkpoint(HF_MODEL)


def _hf_folder(tmp_path, tensors, **config_changes):
  """A writable HF folder with the fixture config (plus changes) and the given tensors."""
  folder = tmp_path / "hf"
  folder.mkdir()
  with open(os.path.join(HF_MODEL, "config.json")) as f:
    config = json.load(f)
  for k, v in config_changes.items():
    if v is None:
      config.pop(k, None)
    else:
      config[k] = v
  (folder / "config.json").write_text(json.dumps(config))
  save_file(tensors, str(folder / "model.safetensors"))
  return str(folder)


def test_config_matches_hf_readme(loaded):
  cfg, _ = loaded
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (96, 24, 3, 8, 40)
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (2, 3)
  assert cfg.mlp_activations == ("gelu", "linear")
  assert cfg.logits_via_embedding is False
  assert cfg.dropout_rate == 0.0 and cfg.layer_norm_epsilon == 1e-6
  assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)


def test_tree_has_exactly_the_t5x_names_and_shapes(loaded):
  with open(MANIFEST) as f:
    manifest = json.load(f)
  flat = flatten_params(loaded[1])
  assert {k: tuple(v.shape) for k, v in flat.items()} == {
      p["name"]: tuple(p["shape"]) for p in manifest["params"]}


@pytest.mark.parametrize("t5x_name,hf_name,transpose", [
    ("token_embedder/embedding", "shared.weight", False),
    ("decoder/logits_dense/kernel", "lm_head.weight", True),
    ("encoder/layers_0/attention/query/kernel", "encoder.block.0.layer.0.SelfAttention.q.weight", True),
    ("encoder/layers_1/attention/out/kernel", "encoder.block.1.layer.0.SelfAttention.o.weight", True),
    ("encoder/layers_1/mlp/wi_0/kernel", "encoder.block.1.layer.1.DenseReluDense.wi_0.weight", True),
    ("encoder/layers_1/mlp/wi_1/kernel", "encoder.block.1.layer.1.DenseReluDense.wi_1.weight", True),
    ("encoder/layers_0/mlp/wo/kernel", "encoder.block.0.layer.1.DenseReluDense.wo.weight", True),
    ("encoder/layers_1/pre_attention_layer_norm/scale", "encoder.block.1.layer.0.layer_norm.weight", False),
    ("encoder/layers_0/pre_mlp_layer_norm/scale", "encoder.block.0.layer.1.layer_norm.weight", False),
    ("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight", False),
    ("encoder/relpos_bias/rel_embedding",
     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
    ("decoder/relpos_bias/rel_embedding",
     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
    ("decoder/layers_2/self_attention/key/kernel", "decoder.block.2.layer.0.SelfAttention.k.weight", True),
    ("decoder/layers_1/encoder_decoder_attention/value/kernel",
     "decoder.block.1.layer.1.EncDecAttention.v.weight", True),
    ("decoder/layers_0/encoder_decoder_attention/query/kernel",
     "decoder.block.0.layer.1.EncDecAttention.q.weight", True),
    ("decoder/layers_2/mlp/wo/kernel", "decoder.block.2.layer.2.DenseReluDense.wo.weight", True),
    ("decoder/layers_0/pre_self_attention_layer_norm/scale", "decoder.block.0.layer.0.layer_norm.weight", False),
    ("decoder/layers_1/pre_cross_attention_layer_norm/scale", "decoder.block.1.layer.1.layer_norm.weight", False),
    ("decoder/layers_2/pre_mlp_layer_norm/scale", "decoder.block.2.layer.2.layer_norm.weight", False),
    ("decoder/decoder_norm/scale", "decoder.final_layer_norm.weight", False),
])
def test_mapping_is_numerically_exact(loaded, hf_tensors, t5x_name, hf_name, transpose):
  ours = flatten_params(loaded[1])[t5x_name]
  ref = hf_tensors[hf_name].T if transpose else hf_tensors[hf_name]
  assert ours.shape == ref.shape
  np.testing.assert_array_equal(ours, ref)


def test_every_value_comes_from_a_distinct_hf_tensor(loaded, hf_tensors):
  # No two t5x params were filled from the same HF tensor (a swapped/duplicated mapping shows).
  flat = flatten_params(loaded[1])
  sources = {}
  for name, value in flat.items():
    matches = [h for h, t in hf_tensors.items()
               if t.shape in (value.shape, value.T.shape) and (
                   np.array_equal(t, value) or np.array_equal(t.T, value))]
    assert len(matches) == 1, (name, matches)
    sources[name] = matches[0]
  assert len(set(sources.values())) == len(flat)


def test_sharded_index_loads_identically(tmp_path, hf_tensors, loaded):
  folder = tmp_path / "sharded"
  folder.mkdir()
  shutil.copy(os.path.join(HF_MODEL, "config.json"), folder / "config.json")
  names = sorted(hf_tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for shard, keys in shards.items():
    save_file({k: hf_tensors[k] for k in keys}, str(folder / shard))
    weight_map.update({k: shard for k in keys})
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  cfg, params = load_checkpoint(str(folder))
  assert cfg == loaded[0]
  a, b = flatten_params(params), flatten_params(loaded[1])
  assert all(a[k].tobytes() == b[k].tobytes() for k in b) and sorted(a) == sorted(b)


def test_tied_rescaled_t5_1_0_maps_to_logits_via_embedding(tmp_path, hf_tensors):
  tensors = {k: v for k, v in hf_tensors.items() if k != "lm_head.weight"}
  folder = _hf_folder(tmp_path, tensors, tie_word_embeddings=True)
  cfg, params = load_checkpoint(folder)
  assert cfg.logits_via_embedding is True
  assert "logits_dense" not in params["decoder"]
  np.testing.assert_array_equal(params["token_embedder"]["embedding"], hf_tensors["shared.weight"])


def test_tied_with_a_different_lm_head_is_refused(tmp_path, hf_tensors):
  folder = _hf_folder(tmp_path, dict(hf_tensors), tie_word_embeddings=True)
  with pytest.raises(CheckpointError, match="tie_word_embeddings.*lm_head.weight"):
    load_checkpoint(folder)


def test_transformers5_unscaled_tied_flag(tmp_path, hf_tensors):
  # transformers 5.x spelling of T5.1.1: tie=true, scale_decoder_outputs=false, lm_head kept.
  folder = _hf_folder(tmp_path, dict(hf_tensors), tie_word_embeddings=True, scale_decoder_outputs=False)
  cfg, params = load_checkpoint(folder)
  assert cfg.logits_via_embedding is False
  np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"], hf_tensors["lm_head.weight"].T)


def test_tied_unscaled_without_lm_head_copies_embedding(tmp_path, hf_tensors):
  tensors = {k: v for k, v in hf_tensors.items() if k != "lm_head.weight"}
  folder = _hf_folder(tmp_path, tensors, tie_word_embeddings=True, scale_decoder_outputs=False)
  cfg, params = load_checkpoint(folder)
  assert cfg.logits_via_embedding is False
  np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"], hf_tensors["shared.weight"].T)


@pytest.mark.parametrize("changes,field", [
    (dict(tie_word_embeddings=False, scale_decoder_outputs=True), "scale_decoder_outputs"),
    (dict(feed_forward_proj="gelu"), "feed_forward_proj"),
    (dict(model_type="umt5"), "model_type"),
])
def test_unrepresentable_configs_are_refused(tmp_path, hf_tensors, changes, field):
  folder = _hf_folder(tmp_path, dict(hf_tensors), **changes)
  with pytest.raises(CheckpointError) as e:
    load_checkpoint(folder)
  assert field in str(e.value) and "config.json" in str(e.value)


def test_unknown_tensor_is_named(tmp_path, hf_tensors):
  tensors = dict(hf_tensors)
  tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros(
      (32, 3), np.float32)
  folder = _hf_folder(tmp_path, tensors)
  with pytest.raises(CheckpointError, match="encoder.block.1.layer.0.SelfAttention.relative_attention_bias"):
    load_checkpoint(folder)


def test_relu_variant_and_config_path_detection(tmp_path, hf_tensors):
  # feed_forward_proj='relu' (T5.1.0 MLP): one 'wi' kernel; built by renaming wi_0 and dropping wi_1.
  tensors = {}
  for k, v in hf_tensors.items():
    if ".wi_1." in k:
      continue
    tensors[k.replace(".wi_0.", ".wi.")] = v
  folder = _hf_folder(tmp_path, tensors, feed_forward_proj="relu")
  assert detect_format(os.path.join(folder, "config.json")) == ("hf", folder)
  cfg, params = load_checkpoint(folder)
  assert cfg.mlp_activations == ("relu",)
  np.testing.assert_array_equal(params["decoder"]["layers_1"]["mlp"]["wi"]["kernel"],
                                hf_tensors["decoder.block.1.layer.2.DenseReluDense.wi_0.weight"].T)


def test_malformed_files_are_named_checkpoint_errors(tmp_path, hf_tensors):
  # config.json that is not an object, and a non-numeric num_layers
  folder = _hf_folder(tmp_path, dict(hf_tensors))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump([1, 2], f)
  with pytest.raises(CheckpointError, match="config.json.*JSON object"):
    load_checkpoint(folder)
  with open(os.path.join(HF_MODEL, "config.json")) as f:
    good = json.load(f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(good, num_layers="two"), f)
  with pytest.raises(CheckpointError, match="config.json.*invalid T5 configuration"):
    load_checkpoint(folder)
  # a sharded folder whose index is not JSON, or maps names to non-strings
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  shutil.copy(os.path.join(HF_MODEL, "config.json"), sharded / "config.json")
  index = sharded / "model.safetensors.index.json"
  for text in ("{not json", json.dumps({"weight_map": {"shared.weight": 3}})):
    index.write_text(text)
    with pytest.raises(CheckpointError, match="index"):
      load_checkpoint(str(sharded))
  # a safetensors header entry without its dtype
  header = json.dumps({"shared.weight": {"shape": [2], "data_offsets": [0, 8]}}).encode()
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
  from phatgoose_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  with pytest.raises(CheckpointError, match="shared.weight.*dtype"):
    hf.read_safetensors(str(bad))
