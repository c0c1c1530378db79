"""Our own checkpoints: atomic Orbax save, bitwise round trip, and the content fingerprint."""
import json
import os

import numpy as np
import pytest

from phatgoose_jax.checkpoints import (CheckpointError, detect_format, load_checkpoint,
                                       params_fingerprint, read_metadata, save_checkpoint)
from phatgoose_jax.checkpoints import ours
from phatgoose_jax.checkpoints.shapes import flatten_params, unflatten_params

LEGACY = os.path.join(os.path.dirname(__file__), "..", "testdata", "t5x_t5_1_1_tiny", "legacy")


@pytest.fixture(scope="module")
def base():
  cfg, params = load_checkpoint(LEGACY)
  return cfg.replace(dtype="float32", dropout_rate=0.0), params


def _siblings(directory):
  return sorted(os.listdir(os.path.dirname(directory)))


def test_round_trip_is_bitwise(tmp_path, base):
  cfg, params = base
  target = str(tmp_path / "ckpt")
  fp = save_checkpoint(target, params, cfg, step=7, extra_metadata={"task": "base"})
  assert detect_format(target) == ("phatgoose_jax", target)
  cfg2, params2 = load_checkpoint(target)
  assert cfg2 == cfg
  a, b = flatten_params(params), flatten_params(params2)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  meta = read_metadata(target)
  assert meta["step"] == 7 and meta["extra_metadata"] == {"task": "base"}
  assert meta["fingerprint"] == fp == params_fingerprint(params2)
  with open(os.path.join(target, "phatgoose_config.json")) as f:
    assert json.load(f) == cfg.to_dict()
  assert _siblings(target) == ["ckpt"]  # No temporary directory left behind.


def test_bfloat16_round_trip(tmp_path, base):
  cfg = base[0].replace(param_dtype="bfloat16")
  _, params = load_checkpoint(LEGACY, config=cfg)
  save_checkpoint(str(tmp_path / "bf"), params, cfg)
  cfg2, params2 = load_checkpoint(str(tmp_path / "bf"))
  assert cfg2.param_dtype == "bfloat16"
  a, b = flatten_params(params), flatten_params(params2)
  assert all(str(b[k].dtype) == "bfloat16" and a[k].tobytes() == b[k].tobytes() for k in a)


def test_existing_directory_needs_overwrite(tmp_path, base):
  cfg, params = base
  target = str(tmp_path / "ckpt")
  save_checkpoint(target, params, cfg, step=1)
  with pytest.raises(CheckpointError, match="already exists"):
    save_checkpoint(target, params, cfg, step=2)
  assert read_metadata(target)["step"] == 1
  changed = flatten_params(params)
  changed["encoder/encoder_norm/scale"] = changed["encoder/encoder_norm/scale"] * 2
  save_checkpoint(target, unflatten_params(changed), cfg, step=2, overwrite=True)
  assert read_metadata(target)["step"] == 2
  _, loaded = load_checkpoint(target)
  np.testing.assert_array_equal(loaded["encoder"]["encoder_norm"]["scale"],
                                changed["encoder/encoder_norm/scale"])
  assert _siblings(target) == ["ckpt"]


def test_failed_write_leaves_nothing(tmp_path, base, monkeypatch):
  cfg, params = base
  target = str(tmp_path / "ckpt")
  def boom(*args, **kwargs):
    raise RuntimeError("disk full")
  monkeypatch.setattr(ours.json, "dump", boom)  # Fails after the Orbax params were written.
  with pytest.raises(RuntimeError, match="disk full"):
    save_checkpoint(target, params, cfg)
  assert os.listdir(tmp_path) == []


def test_params_are_stored_in_param_dtype_so_the_fingerprint_matches_the_load(tmp_path, base):
  cfg, params = base  # float32 config
  as_bf16 = unflatten_params({k: v.astype("bfloat16") for k, v in flatten_params(params).items()})
  fp = save_checkpoint(str(tmp_path / "c"), as_bf16, cfg)
  _, loaded = load_checkpoint(str(tmp_path / "c"))
  assert all(v.dtype == np.float32 for v in flatten_params(loaded).values())
  assert fp == params_fingerprint(loaded) == read_metadata(str(tmp_path / "c"))["fingerprint"]


def test_failed_overwrite_swap_keeps_the_old_checkpoint(tmp_path, base, monkeypatch):
  cfg, params = base
  target = str(tmp_path / "ckpt")
  save_checkpoint(target, params, cfg, step=1)
  real_replace, calls = os.replace, []
  def flaky(src, dst):
    calls.append((src, dst))
    if len(calls) == 2:  # the old checkpoint was moved aside; the new one fails to move in
      raise OSError("device busy")
    return real_replace(src, dst)
  monkeypatch.setattr(ours.os, "replace", flaky)
  with pytest.raises(OSError, match="device busy"):
    save_checkpoint(target, params, cfg, step=2, overwrite=True)
  monkeypatch.undo()
  assert read_metadata(target)["step"] == 1  # still there, and loadable
  load_checkpoint(target)
  assert _siblings(target) == ["ckpt"]


def test_params_must_match_config(tmp_path, base):
  cfg, params = base
  with pytest.raises(CheckpointError, match=r"layers_0/mlp/wi_0/kernel' has shape \(24, 40\), expected \(24, 41\)"):
    save_checkpoint(str(tmp_path / "ckpt"), params, cfg.replace(mlp_dim=41))
  assert os.listdir(tmp_path) == []


def test_fingerprint_is_stable_and_sensitive(base):
  _, params = base
  flat = flatten_params(params)
  fp = params_fingerprint(params)
  assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
  reordered = unflatten_params({k: flat[k].copy() for k in reversed(list(flat))})
  assert params_fingerprint(reordered) == fp
  assert params_fingerprint(flat) == fp  # Flat and nested trees hash alike.

  one_ulp = dict(flat)
  x = flat["decoder/layers_2/mlp/wo/kernel"].copy()
  x[3, 5] = np.nextafter(x[3, 5], np.float32(np.inf))
  one_ulp["decoder/layers_2/mlp/wo/kernel"] = x
  renamed = dict(flat)
  renamed["decoder/layers_2/mlp/wo2/kernel"] = renamed.pop("decoder/layers_2/mlp/wo/kernel")
  recast = dict(flat)
  recast["encoder/encoder_norm/scale"] = flat["encoder/encoder_norm/scale"].astype(np.float64)
  reshaped = dict(flat)
  reshaped["encoder/encoder_norm/scale"] = flat["encoder/encoder_norm/scale"].reshape(4, 6)
  fps = {params_fingerprint(t) for t in (one_ulp, renamed, recast, reshaped)}
  assert len(fps) == 4 and fp not in fps


def test_missing_config_file_is_reported(tmp_path, base):
  cfg, params = base
  target = str(tmp_path / "ckpt")
  save_checkpoint(target, params, cfg)
  with open(os.path.join(target, "phatgoose_config.json"), "w") as f:
    json.dump(dict(cfg.to_dict(), bogus_field=1), f)
  with pytest.raises(CheckpointError, match="phatgoose_config.json"):
    load_checkpoint(target)
