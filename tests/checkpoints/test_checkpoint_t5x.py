"""Legacy (msgpack + TensorStore) and Orbax T5X checkpoints written by t5x itself."""
import json
import os
import shutil
import stat

import msgpack
import numpy as np
import pytest
import tensorstore as ts

from phatgoose_jax.checkpoints import CheckpointError, detect_format, load_checkpoint
from phatgoose_jax.checkpoints.shapes import flatten_params
from phatgoose_jax.models.config import tiny_config

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "testdata", "t5x_t5_1_1_tiny")
LEGACY = os.path.join(FIXTURE, "legacy")
ORBAX = os.path.join(FIXTURE, "orbax")


def _writable_copy(src, dst):
  """Copies a (read-only) fixture tree and makes the copy writable."""
  shutil.copytree(src, dst)
  for root, dirs, files in os.walk(dst):
    for name in dirs + files:
      p = os.path.join(root, name)
      os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
  os.chmod(dst, os.stat(dst).st_mode | stat.S_IWUSR)
  return dst


@pytest.fixture(scope="module")
def manifest():
  with open(os.path.join(FIXTURE, "params_manifest.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def legacy():
  return load_checkpoint(LEGACY)


@pytest.fixture(scope="module")
def orbax():
  return load_checkpoint(os.path.join(ORBAX, "checkpoint_0"))


def test_both_formats_match_manifest(legacy, orbax, manifest):
  for _, params in (legacy, orbax):
    flat = flatten_params(params)
    assert {k: tuple(v.shape) for k, v in flat.items()} == {
        p["name"]: tuple(p["shape"]) for p in manifest["params"]}
    assert all(v.dtype == np.float32 for v in flat.values())
    assert all(np.unique(v).size > 1 for v in flat.values())  # Real data, not placeholders.


def test_legacy_and_orbax_are_bit_identical(legacy, orbax):
  a, b = flatten_params(legacy[1]), flatten_params(orbax[1])
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].tobytes() == b[k].tobytes(), k


def test_inferred_config_matches_manifest(legacy, orbax, manifest):
  assert legacy[0] == orbax[0]
  for field, value in manifest["t5_config"].items():
    if field in ("dtype", "dropout_rate"):
      continue
    got = getattr(legacy[0], field)
    assert (list(got) if isinstance(got, tuple) else got) == value, field


def test_values_equal_independent_tensorstore_reads(legacy, orbax):
  key = "target.decoder.layers_2.encoder_decoder_attention.out.kernel"
  direct = ts.open({"driver": "zarr", "kvstore": {
      "driver": "file", "path": os.path.abspath(os.path.join(LEGACY, "checkpoint_0", key))}},
                   open=True).result().read().result()
  np.testing.assert_array_equal(
      legacy[1]["decoder"]["layers_2"]["encoder_decoder_attention"]["out"]["kernel"], direct)
  key = "target.encoder.relpos_bias.rel_embedding"
  direct = ts.open({"driver": "zarr", "kvstore": {
      "driver": "ocdbt", "base": "file://" + os.path.abspath(os.path.join(ORBAX, "checkpoint_0", "state")),
      "path": key}}, open=True).result().read().result()
  np.testing.assert_array_equal(orbax[1]["encoder"]["relpos_bias"]["rel_embedding"], direct)
  assert direct.shape == (3, 32)


def test_path_forms_all_resolve(legacy, orbax):
  for p in (os.path.join(LEGACY, "checkpoint_0"), os.path.join(LEGACY, "checkpoint_0", "checkpoint")):
    assert detect_format(p)[0] == "t5x_legacy"
    _, params = load_checkpoint(p)
    np.testing.assert_array_equal(params["token_embedder"]["embedding"],
                                  legacy[1]["token_embedder"]["embedding"])
  for p in (ORBAX, os.path.join(ORBAX, "checkpoint_0", "state")):
    assert detect_format(p)[0] == "t5x_orbax"
    _, params = load_checkpoint(p)
    np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"],
                                  orbax[1]["decoder"]["logits_dense"]["kernel"])


def test_parent_dir_takes_highest_step_numerically(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  _writable_copy(os.path.join(LEGACY, "checkpoint_0"), str(run / "checkpoint_2"))
  _writable_copy(os.path.join(ORBAX, "checkpoint_0"), str(run / "checkpoint_10"))
  fmt, resolved = detect_format(str(run))
  assert fmt == "t5x_orbax" and resolved.endswith("checkpoint_10")


def test_given_config_is_returned_and_param_dtype_applied():
  cfg = tiny_config(param_dtype="bfloat16", dropout_rate=0.05)
  got_cfg, params = load_checkpoint(LEGACY, config=cfg)
  assert got_cfg is cfg
  assert str(params["encoder"]["encoder_norm"]["scale"].dtype) == "bfloat16"


# --- building altered legacy checkpoints -------------------------------------------------------


def _altered_legacy(tmp_path, edit):
  """Copies the legacy fixture and applies ``edit(target_tree)`` to the raw msgpack."""
  ckpt = _writable_copy(os.path.join(LEGACY, "checkpoint_0"), str(tmp_path / "checkpoint_0"))
  path = os.path.join(ckpt, "checkpoint")
  with open(path, "rb") as f:
    state = msgpack.unpackb(f.read(), raw=False)  # Ext types stay msgpack.ExtType objects.
  edit(state["optimizer"]["target"])
  with open(path, "wb") as f:
    f.write(msgpack.packb(state, use_bin_type=True))
  return ckpt


def _inline(array):
  """A flax msgpack ext-type-1 array, as t5x writes small leaves."""
  payload = msgpack.packb((list(array.shape), array.dtype.name, array.tobytes()), use_bin_type=True)
  return msgpack.ExtType(1, payload)


def test_inline_msgpack_array_leaf_is_read(tmp_path):
  values = np.arange(40 * 24, dtype=np.float32).reshape(40, 24) / 7
  def edit(target):
    target["encoder"]["layers_1"]["mlp"]["wo"]["kernel"] = _inline(values)
  ckpt = _altered_legacy(tmp_path, edit)
  _, params = load_checkpoint(ckpt)
  np.testing.assert_array_equal(params["encoder"]["layers_1"]["mlp"]["wo"]["kernel"], values)


def test_wrong_shape_names_path_param_and_shapes(tmp_path):
  def edit(target):
    target["encoder"]["layers_1"]["mlp"]["wo"]["kernel"] = _inline(np.ones((41, 24), np.float32))
  ckpt = _altered_legacy(tmp_path, edit)
  for config in (tiny_config(), None):  # Given config, and inferred config (mlp_dim from layer 0).
    with pytest.raises(CheckpointError) as e:
      load_checkpoint(ckpt, config=config)
    msg = str(e.value)
    assert ckpt in msg and "encoder/layers_1/mlp/wo/kernel" in msg
    assert "(41, 24)" in msg and "(40, 24)" in msg


def test_missing_and_unexpected_parameters_are_named(tmp_path):
  def edit(target):
    del target["decoder"]["layers_1"]["self_attention"]["value"]
    target["encoder"]["layers_0"]["mlp"]["extra"] = {"kernel": _inline(np.ones((2,), np.float32))}
  ckpt = _altered_legacy(tmp_path, edit)
  with pytest.raises(CheckpointError) as e:
    load_checkpoint(ckpt, config=tiny_config())
  msg = str(e.value)
  assert "decoder/layers_1/self_attention/value/kernel" in msg
  assert "encoder/layers_0/mlp/extra/kernel" in msg and ckpt in msg


def test_random_dir_and_missing_path(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(CheckpointError) as e:
    load_checkpoint(str(tmp_path))
  assert str(tmp_path) in str(e.value) and "looked for" in str(e.value)
  with pytest.raises(CheckpointError, match="does not exist"):
    load_checkpoint(str(tmp_path / "nope"))


@pytest.mark.parametrize("content", [b"this is not msgpack at all", b"\xc1\xc1\xc1", b"\x93\x01\x02\x03"])
def test_file_that_is_not_msgpack(tmp_path, content):
  path = tmp_path / "checkpoint_3" / "checkpoint"
  path.parent.mkdir()
  path.write_bytes(content)
  for p in (str(path), str(path.parent), str(tmp_path)):
    with pytest.raises(CheckpointError) as e:
      load_checkpoint(p)
    assert str(path) in str(e.value) and "msgpack" in str(e.value)


def _spec_leaves(target):
  """(parent dict, key) of every TensorStore spec leaf of a raw msgpack target tree."""
  out = []
  for key, value in target.items():
    if isinstance(value, dict) and "driver" in value:
      out.append((target, key))
    elif isinstance(value, dict):
      out.extend(_spec_leaves(value))
  return out


@pytest.mark.parametrize("driver", ["gcs", "gfile"])
def test_specs_written_under_gcs_or_gfile_read_relative_to_the_checkpoint(tmp_path, legacy,
                                                                          driver):
  """t5x saving to gs:// records {'driver': 'gcs', 'bucket': 't5x-dummy-bucket', 'path': rel}
  (the public T5X checkpoints, copied locally, have these specs); t5x reads such paths relative
  to the checkpoint directory, so must we (before, TensorStore went to the network)."""
  seen = []
  def edit(target):
    for parent, key in _spec_leaves(target):
      kv = parent[key]["kvstore"]
      parent[key]["kvstore"] = ({"driver": "gcs", "bucket": "t5x-dummy-bucket",
                                 "path": kv["path"]} if driver == "gcs" else
                                {"driver": "gfile", "path": kv["path"]})
      seen.append(key)
  ckpt = _altered_legacy(tmp_path, edit)
  assert seen  # the fixture stores its large arrays as TensorStore leaves
  _, params = load_checkpoint(ckpt)
  want, got = flatten_params(legacy[1]), flatten_params(params)
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_absolute_specs_point_into_the_checkpoint_dir_or_its_bucket():
  from phatgoose_jax.checkpoints import t5x_legacy  # pylint: disable=g-import-not-at-top
  gcs = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket",
                                       "path": "target.encoder.kernel"}}
  assert t5x_legacy._absolute_spec(gcs, "gs://my-bucket/runs/checkpoint_5")["kvstore"] == {
      "driver": "gcs", "bucket": "my-bucket", "path": "runs/checkpoint_5/target.encoder.kernel"}
  assert t5x_legacy._absolute_spec(gcs, "/data/ckpt/checkpoint_5")["kvstore"] == {
      "driver": "file", "path": "/data/ckpt/checkpoint_5/target.encoder.kernel"}
  absolute = {"driver": "zarr", "kvstore": {"driver": "file", "path": "/elsewhere/x"}}
  assert t5x_legacy._absolute_spec(absolute, "/data/c")["kvstore"]["path"] == "/elsewhere/x"
  old = {"driver": "zarr", "path": "target.x"}  # tensorstore < 0.1.14 spec
  assert t5x_legacy._absolute_spec(old, "gs://b/c")["kvstore"] == {
      "driver": "gcs", "bucket": "b", "path": "c/target.x"}


def test_flax_chunked_array_leaf_is_read(tmp_path):
  """flax splits inline arrays over its chunk limit; its own chunk format (shape as a dict)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  values = np.arange(40 * 24, dtype=np.float32).reshape(40, 24) / 3
  old_limit = serialization.MAX_CHUNK_SIZE
  serialization.MAX_CHUNK_SIZE = 1024  # bytes: forces 4 chunks for this 3840-byte array
  try:
    chunked = serialization._chunk(values)  # pylint: disable=protected-access
  finally:
    serialization.MAX_CHUNK_SIZE = old_limit
  assert isinstance(chunked["shape"], dict) and len(chunked["chunks"]) > 1
  leaf = {"__msgpack_chunked_array__": True, "shape": chunked["shape"],
          "chunks": {k: _inline(np.asarray(v)) for k, v in chunked["chunks"].items()}}
  def edit(target):
    target["encoder"]["layers_1"]["mlp"]["wo"]["kernel"] = leaf
  _, params = load_checkpoint(_altered_legacy(tmp_path, edit))
  np.testing.assert_array_equal(params["encoder"]["layers_1"]["mlp"]["wo"]["kernel"], values)


def test_orbax_metadata_without_use_ocdbt_finds_the_ocdbt_manifest(tmp_path, orbax):
  """Older Orbax metadata has no 'use_ocdbt'; Orbax then looks for manifest.ocdbt, as we do."""
  ckpt = _writable_copy(os.path.join(ORBAX, "checkpoint_0"), str(tmp_path / "checkpoint_0"))
  meta_path = os.path.join(ckpt, "state", "_METADATA")
  with open(meta_path) as f:
    meta = json.load(f)
  assert meta.pop("use_ocdbt") is True
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  _, params = load_checkpoint(ckpt)
  want, got = flatten_params(orbax[1]), flatten_params(params)
  assert want.keys() == got.keys()
  assert all(np.array_equal(got[k], want[k]) for k in want)
