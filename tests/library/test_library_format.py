"""ExpertLibrary on disk: round trips, isolation of entries, crash safety, compatibility checks."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from phatgoose_jax.library import ExpertLibrary, LibraryError, site_shapes
from phatgoose_jax.library import format as fmt
from phatgoose_jax.models.config import tiny_config

# Odd dims so that a transposed [D, R] / [R, F] cannot pass: D=13, joined kv 15, mlp 7.
CONFIG = tiny_config(emb_dim=13, num_heads=3, head_dim=5, mlp_dim=7, num_encoder_layers=1,
                     num_decoder_layers=1)
FP = "sha256:" + "ab" * 32
SHAPES = site_shapes(CONFIG)


def make_lora(seed, rank=3, dtype=np.float32, sites=None):
  rng = np.random.default_rng(seed)
  sites = list(SHAPES) if sites is None else sites
  return {s: {"lora_a": rng.normal(size=(SHAPES[s][0], rank)).astype(dtype),
              "lora_b": rng.normal(size=(rank, SHAPES[s][1])).astype(dtype)} for s in sites}


def make_vectors(seed, sites=None):
  rng = np.random.default_rng(seed)
  return {s: rng.normal(size=(SHAPES[s][0],)).astype(np.float32)
          for s in (list(SHAPES) if sites is None else sites)}


@pytest.fixture
def lib(tmp_path):
  return ExpertLibrary.create(str(tmp_path / "lib"), FP, CONFIG)


def test_site_shapes_cover_t5_sites():
  assert len(SHAPES) == 4 + 3 + 4 + 4 + 3  # enc attn+mlp, dec self+cross+mlp (1 layer each)
  assert SHAPES["encoder/layers_0/attention/query"] == (13, 15)
  assert SHAPES["encoder/layers_0/attention/out"] == (15, 13)
  assert SHAPES["decoder/layers_0/mlp/wo"] == (7, 13)
  assert len(site_shapes(tiny_config())) == 47


def test_create_add_list_remove_round_trip_bitwise(lib, tmp_path):
  loras = {n: make_lora(i) for i, n in enumerate(["t0", "t1", "t2"])}
  gates = make_vectors(10)
  lib.add("t0", loras["t0"], 0.25, task="task zero", gates=gates,
          provenance={"training_run": "run/7"})
  lib.add("t1", loras["t1"], 2.0)
  lib.add("t2", loras["t2"], 1 / 3)
  reopened = ExpertLibrary.open(lib.path)
  assert reopened.names() == ["t0", "t1", "t2"]
  assert reopened.base_fingerprint == FP and reopened.t5_config == CONFIG
  assert reopened.sites == list(SHAPES)
  e0 = reopened.load("t0")
  assert e0.task == "task zero" and e0.rank == 3 and e0.scale == 0.25
  for site in SHAPES:
    for k in ("lora_a", "lora_b"):
      got, want = e0.lora[site][k], loras["t0"][site][k]
      assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert e0.vectors["gate"][site].tobytes() == gates[site].tobytes()
  meta = reopened.metadata("t0")
  assert meta["provenance"]["training_run"] == "run/7" and "created" in meta["provenance"]
  assert meta["base_fingerprint"] == FP and meta["vectors"] == ["gate"]
  assert meta["arrays"]["decoder/layers_0/mlp/wo/lora_b"] == {"shape": [3, 13],
                                                              "dtype": "float32"}
  assert reopened.load("t2").scale == pytest.approx(1 / 3)
  assert reopened.load("t1").vectors == {}
  reopened.remove("t1")
  assert ExpertLibrary.open(lib.path).names() == ["t0", "t2"]
  assert not os.path.exists(os.path.join(lib.experts_dir, "t1"))
  assert sorted(os.listdir(lib.experts_dir)) == ["t0", "t2"]
  with pytest.raises(LibraryError, match="'t1' is not in the library"):
    reopened.load("t1")
  with pytest.raises(LibraryError, match="'t1' is not in the library"):
    reopened.remove("t1")


def test_bfloat16_round_trip_and_jax_inputs(lib):
  import jax.numpy as jnp
  lora = make_lora(3, dtype=ml_dtypes.bfloat16)
  lora = {s: {k: jnp.asarray(v) for k, v in d.items()} for s, d in lora.items()}
  lib.add("bf", lora, 0.5)
  got = lib.load("bf").lora["encoder/layers_0/mlp/wi_0"]["lora_a"]
  want = np.asarray(lora["encoder/layers_0/mlp/wi_0"]["lora_a"])
  assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[p] = (fh.read(), os.stat(p).st_mtime_ns, os.stat(p).st_ino)
  return out


def test_add_set_vectors_remove_never_touch_other_entries(lib):
  lib.add("a", make_lora(0), 1.0)
  lib.add("b", make_lora(1), 1.0)
  before = _snapshot(os.path.join(lib.experts_dir, "a"))
  lib.add("c", make_lora(2), 1.0)
  lib.add("b", make_lora(5), 0.5, overwrite=True)
  lib.set_vectors("c", "prototype_arrow", make_vectors(3))
  lib.remove("b")
  assert _snapshot(os.path.join(lib.experts_dir, "a")) == before
  assert lib.names() == ["a", "c"]


def test_overwrite_keeps_order_and_refuses_without_flag(lib):
  lib.add("a", make_lora(0), 1.0)
  lib.add("b", make_lora(1), 1.0)
  with pytest.raises(LibraryError, match="'a' already exists"):
    lib.add("a", make_lora(2), 1.0)
  lib.add("a", make_lora(2), 0.5, overwrite=True)
  assert lib.names() == ["a", "b"]
  got = lib.load("a")
  assert got.scale == 0.5
  site = "decoder/layers_0/self_attention/key"
  assert got.lora[site]["lora_a"].tobytes() == make_lora(2)[site]["lora_a"].tobytes()
  assert not [d for d in os.listdir(lib.experts_dir) if d.startswith(".")]


def test_set_vectors_adds_kinds_and_keeps_lora_bytes(lib):
  lib.add("a", make_lora(0), 1.0)
  weights = os.path.join(lib.experts_dir, "a", fmt.WEIGHTS_FILE)
  lora_before = {k: v.tobytes() for k, v in fmt.read_safetensors_file(weights).items()}
  gates = make_vectors(1)
  lib.set_vectors("a", "gate", gates, provenance={"training_run": "gate-run"})
  lib.set_vectors("a", "prototype_average_activation", make_vectors(2))
  e = lib.load("a")
  assert sorted(e.vectors) == ["gate", "prototype_average_activation"]
  assert e.vectors["gate"]["encoder/layers_0/attention/value"].tobytes() == gates[
      "encoder/layers_0/attention/value"].tobytes()
  after = fmt.read_safetensors_file(weights)
  assert all(after[k].tobytes() == b for k, b in lora_before.items())
  assert e.metadata["vector_provenance"]["gate"]["training_run"] == "gate-run"
  with pytest.raises(LibraryError, match="'gate' at encoder/layers_0/attention/query has shape"):
    bad = make_vectors(4)
    bad["encoder/layers_0/attention/query"] = np.zeros(12, np.float32)
    lib.set_vectors("a", "gate", bad)
  with pytest.raises(LibraryError, match="missing"):
    lib.set_vectors("a", "gate", make_vectors(4, sites=list(SHAPES)[:3]))
  with pytest.raises(LibraryError, match="invalid vector kind"):
    lib.set_vectors("a", "lora_a", make_vectors(4))


# ---------------------------------------------------------------------------------------------
# Crash safety: partially written / corrupted entries are refused, never read as valid.
# ---------------------------------------------------------------------------------------------


def test_entry_without_metadata_is_refused(lib):
  lib.add("a", make_lora(0), 1.0)
  os.remove(os.path.join(lib.experts_dir, "a", fmt.METADATA_FILE))
  with pytest.raises(LibraryError, match=r"expert 'a': field 'metadata'.*missing"):
    lib.load("a")
  with pytest.raises(LibraryError, match=r"expert 'a': field 'metadata'"):
    lib.stack(vectors=None)


def test_truncated_weights_are_refused(lib):
  lib.add("a", make_lora(0), 1.0)
  path = os.path.join(lib.experts_dir, "a", fmt.WEIGHTS_FILE)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(LibraryError, match=r"expert 'a': field 'weights_sha256'"):
    lib.load("a")
  # Even when the metadata's hash is made to agree, the truncation itself is detected.
  meta_path = os.path.join(lib.experts_dir, "a", fmt.METADATA_FILE)
  meta = json.load(open(meta_path))
  meta["weights_sha256"] = fmt.sha256_bytes(data[: len(data) // 2])
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(LibraryError, match="truncated safetensors"):
    lib.load("a")


def test_wrong_hash_and_tampered_metadata_are_refused(lib):
  lib.add("a", make_lora(0), 1.0)
  meta_path = os.path.join(lib.experts_dir, "a", fmt.METADATA_FILE)
  meta = json.load(open(meta_path))
  meta["weights_sha256"] = "sha256:" + "0" * 64
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(LibraryError, match=r"expert 'a': field 'weights_sha256'"):
    lib.load("a")
  lib.add("b", make_lora(1), 1.0)
  meta_path = os.path.join(lib.experts_dir, "b", fmt.METADATA_FILE)
  meta = json.load(open(meta_path))
  del meta["scale"]
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(LibraryError, match=r"expert 'b'.*lacks field\(s\) scale"):
    lib.load("b")


def test_flipped_weight_byte_is_refused(lib):
  lib.add("a", make_lora(0), 1.0)
  path = os.path.join(lib.experts_dir, "a", fmt.WEIGHTS_FILE)
  data = bytearray(open(path, "rb").read())
  data[-3] ^= 0x01
  open(path, "wb").write(bytes(data))
  with pytest.raises(LibraryError, match="weights_sha256"):
    lib.load("a")


def test_crash_during_entry_write_leaves_library_unchanged(lib, monkeypatch):
  lib.add("a", make_lora(0), 1.0)
  before = _snapshot(lib.path)
  real_replace = os.replace

  def crash_on_dir(src, dst):
    if os.path.isdir(src):
      raise OSError("simulated crash")
    return real_replace(src, dst)

  monkeypatch.setattr(fmt.os, "replace", crash_on_dir)
  with pytest.raises(OSError, match="simulated crash"):
    lib.add("b", make_lora(1), 1.0)
  monkeypatch.setattr(fmt.os, "replace", real_replace)
  assert _snapshot(lib.path) == before  # no new entry, no temp dir, index untouched
  assert ExpertLibrary.open(lib.path).names() == ["a"]
  assert lib.check() == []


def test_failed_overwrite_swap_restores_the_previous_entry(lib, monkeypatch):
  lib.add("a", make_lora(0), 1.0)
  before = _snapshot(lib.path)
  real_replace, calls = os.replace, []

  def fail_second_dir_move(src, dst):
    if os.path.isdir(src):
      calls.append(src)
      if len(calls) == 2:  # the old entry was moved aside; the new one fails to move in
        raise OSError("simulated crash")
    return real_replace(src, dst)

  monkeypatch.setattr(fmt.os, "replace", fail_second_dir_move)
  with pytest.raises(OSError, match="simulated crash"):
    lib.add("a", make_lora(1), 0.5, overwrite=True)
  monkeypatch.setattr(fmt.os, "replace", real_replace)
  assert _snapshot(lib.path) == before  # the old entry is back, nothing left behind
  np.testing.assert_array_equal(ExpertLibrary.open(lib.path).load("a").lora[
      next(iter(make_lora(0)))]["lora_a"], make_lora(0)[next(iter(make_lora(0)))]["lora_a"])


def test_leftover_temp_and_orphan_dirs_are_reported_not_listed(lib):
  lib.add("a", make_lora(0), 1.0)
  os.makedirs(os.path.join(lib.experts_dir, ".b.tmp-123"))
  os.makedirs(os.path.join(lib.experts_dir, "orphan"))
  assert lib.names() == ["a"]
  problems = lib.check()
  assert any(".b.tmp-123" in p for p in problems) and any("orphan" in p for p in problems)


# ---------------------------------------------------------------------------------------------
# Compatibility checks.
# ---------------------------------------------------------------------------------------------


def test_mismatched_fingerprint_is_refused(lib):
  with pytest.raises(LibraryError, match=r"expert 'x': field 'base_fingerprint'"):
    lib.add("x", make_lora(0), 1.0, base_fingerprint="sha256:" + "cd" * 32)
  lib.add("y", make_lora(0), 1.0, base_fingerprint=FP)
  meta_path = os.path.join(lib.experts_dir, "y", fmt.METADATA_FILE)
  meta = json.load(open(meta_path))
  meta["base_fingerprint"] = "sha256:" + "cd" * 32
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(LibraryError, match=r"expert 'y': field 'base_fingerprint'"):
    lib.load("y")


def test_mismatched_sites_are_refused(lib):
  lib.add("first", make_lora(0), 1.0)
  fewer = make_lora(1, sites=list(SHAPES)[:-1])
  with pytest.raises(LibraryError, match=r"expert 'x': field 'sites'.*missing \['decoder/"):
    lib.add("x", fewer, 1.0)
  bogus = make_lora(1)
  bogus["encoder/layers_5/attention/query"] = bogus["encoder/layers_0/attention/query"]
  with pytest.raises(LibraryError, match=r"expert 'x': field 'sites': unknown site"):
    lib.add("x", bogus, 1.0)


def test_pinned_sites_and_rank_at_create(tmp_path):
  sites = list(SHAPES)[:4]
  lib = ExpertLibrary.create(str(tmp_path / "l"), FP, CONFIG, sites=sites, rank=3)
  lib.add("ok", make_lora(0, sites=sites), 1.0)
  with pytest.raises(LibraryError, match=r"expert 'r4': field 'rank' is 4, the library pins"):
    lib.add("r4", make_lora(0, rank=4, sites=sites), 1.0)
  with pytest.raises(LibraryError, match=r"expert 'all': field 'sites'"):
    lib.add("all", make_lora(0), 1.0)


def test_bad_shapes_rank_and_scale_are_refused(lib):
  lora = make_lora(0)
  site = "encoder/layers_0/attention/out"
  lora[site]["lora_a"] = lora[site]["lora_a"][:-1]  # D = 14 instead of 15
  with pytest.raises(LibraryError, match=rf"expert 'x': field 'lora_a' at {site} has shape"):
    lib.add("x", lora, 1.0)
  lora = make_lora(0)
  lora[site] = make_lora(0, rank=2)[site]
  with pytest.raises(LibraryError, match=r"expert 'x': field 'rank'"):
    lib.add("x", lora, 1.0)
  lora = make_lora(0)
  lora[site]["lora_b"] = lora[site]["lora_b"].T
  with pytest.raises(LibraryError, match=r"field 'lora_b'"):
    lib.add("x", lora, 1.0)
  with pytest.raises(LibraryError, match=r"field 'scale' must be finite"):
    lib.add("x", make_lora(0), float("nan"))
  lora = make_lora(0)
  lora[site]["lora_a"][0, 0] = np.inf
  with pytest.raises(LibraryError, match="non-finite"):
    lib.add("x", lora, 1.0)
  with pytest.raises(LibraryError, match="invalid expert name"):
    lib.add("../evil", make_lora(0), 1.0)
  assert lib.names() == [] and os.listdir(lib.experts_dir) == []


def test_create_and_open_errors(tmp_path, lib):
  with pytest.raises(LibraryError, match="already holds an expert library"):
    ExpertLibrary.create(lib.path, FP, CONFIG)
  assert ExpertLibrary.create(lib.path, FP, CONFIG, exist_ok=True).path == lib.path
  with pytest.raises(LibraryError, match="'base_fingerprint'"):
    ExpertLibrary.create(lib.path, "sha256:" + "00" * 32, CONFIG, exist_ok=True)
  with pytest.raises(LibraryError, match="does not exist"):
    ExpertLibrary.open(str(tmp_path / "nope"))
  index_path = os.path.join(lib.path, fmt.LIBRARY_FILE)
  index = json.load(open(index_path))
  index["format_version"] = 99
  json.dump(index, open(index_path, "w"))
  with pytest.raises(LibraryError, match="'format_version' is 99"):
    ExpertLibrary.open(lib.path)
  index["format_version"] = fmt.FORMAT_VERSION
  for field, value in (("sites", 3), ("experts", [1]), ("rank", "16")):
    json.dump(dict(index, **{field: value}), open(index_path, "w"))
    with pytest.raises(LibraryError, match=f"field '{field}' must be"):
      ExpertLibrary.open(lib.path)


def test_create_after_an_interrupted_create_reuses_the_directory(tmp_path):
  """A crash between making experts/ and writing library.json leaves a directory that open
  refuses; create may take it over (it holds nothing else)."""
  path = tmp_path / "lib"
  (path / fmt.EXPERTS_DIR).mkdir(parents=True)
  (path / f".{fmt.LIBRARY_FILE}.tmp-abc").write_text("{")
  lib = ExpertLibrary.create(str(path), FP, CONFIG)
  assert lib.names() == [] and ExpertLibrary.open(str(path)).names() == []
  other = tmp_path / "other"
  (other / fmt.EXPERTS_DIR / "x").mkdir(parents=True)  # not an empty experts/: refused
  with pytest.raises(LibraryError, match="non-empty"):
    ExpertLibrary.create(str(other), FP, CONFIG)
