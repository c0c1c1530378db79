"""HF PEFT LoRA import against the hf_t5_1_1_tiny fixture (adapters task_a/b/c)."""
import json
import math
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file  # independent reader for the reference values

from phatgoose_jax.library import (ExpertLibrary, LibraryError, add_peft_adapter,
                                   hf_module_to_site, import_peft_adapter, site_shapes)
from phatgoose_jax.models.config import tiny_config

TASKS = ("task_a", "task_b", "task_c")
# The fixture's T5Config (README): d_model 24, 3 heads x 8, d_ff 40, 2 encoder / 3 decoder blocks.
CONFIG = tiny_config()


@pytest.fixture(scope="module")
def adapters_dir(testdata):
  return testdata / "hf_t5_1_1_tiny" / "adapters"


@pytest.mark.parametrize("task", TASKS)
def test_import_fixture_sites_shapes_scale(adapters_dir, task):
  lora, scale, info = import_peft_adapter(str(adapters_dir / task))
  assert len(lora) == 47
  assert scale == 2.0  # lora_alpha 8 / r 4
  assert info["r"] == 4 and info["import_kind"] == "hf_peft" and not info["use_rslora"]
  shapes = site_shapes(CONFIG)
  assert list(lora) == list(shapes)  # network order, every site of the model
  for site, (d, f) in shapes.items():
    assert lora[site]["lora_a"].shape == (d, 4), site
    assert lora[site]["lora_b"].shape == (4, f), site
    assert lora[site]["lora_a"].dtype == np.float32


@pytest.mark.parametrize("task", TASKS)
def test_delta_w_matches_safetensors_read_independently(adapters_dir, task):
  lora, scale, _ = import_peft_adapter(str(adapters_dir / task))
  raw = load_file(str(adapters_dir / task / "adapter_model.safetensors"))
  cfg = json.load(open(adapters_dir / task / "adapter_config.json"))
  hf_scaling = cfg["lora_alpha"] / cfg["r"]
  pairs = [("encoder.block.1.layer.0.SelfAttention.o", "encoder/layers_1/attention/out"),
           ("decoder.block.2.layer.1.EncDecAttention.k",
            "decoder/layers_2/encoder_decoder_attention/key"),
           ("decoder.block.0.layer.2.DenseReluDense.wi_1", "decoder/layers_0/mlp/wi_1")]
  for module, site in pairs:
    a = raw[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)  # [r, in]
    b = raw[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)  # [out, r]
    delta_hf = hf_scaling * b @ a  # [out, in]
    ours = scale * lora[site]["lora_a"].astype(np.float64) @ lora[site]["lora_b"]  # [in, out]
    np.testing.assert_allclose(ours, delta_hf.T, rtol=1e-12, atol=1e-12)
    x = np.random.default_rng(0).normal(size=(3, a.shape[1]))
    np.testing.assert_allclose(scale * (x @ lora[site]["lora_a"]) @ lora[site]["lora_b"],
                               hf_scaling * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-6)


def test_add_peft_adapters_to_library(adapters_dir, tmp_path):
  lib = ExpertLibrary.create(str(tmp_path / "lib"), "sha256:" + "11" * 32, CONFIG)
  for task in TASKS:
    add_peft_adapter(lib, task, str(adapters_dir / task), task=task)
  assert lib.names() == list(TASKS)
  meta = lib.metadata("task_b")
  assert meta["provenance"]["import_kind"] == "hf_peft" and meta["scale"] == 2.0
  assert meta["provenance"]["source"].endswith("task_b")
  stacked = lib.stack(vectors=None)
  assert stacked["decoder/layers_2/mlp/wo"]["lora_a"].shape == (3, 40, 4)


def test_module_name_mapping():
  assert hf_module_to_site("encoder.block.1.layer.1.DenseReluDense.wi_0") == (
      "encoder/layers_1/mlp/wi_0")
  assert hf_module_to_site("decoder.block.0.layer.0.SelfAttention.v") == (
      "decoder/layers_0/self_attention/value")
  assert hf_module_to_site("decoder.block.0.layer.1.EncDecAttention.o") == (
      "decoder/layers_0/encoder_decoder_attention/out")
  assert hf_module_to_site("encoder.block.0.layer.1.EncDecAttention.q") is None
  assert hf_module_to_site("encoder.block.0.layer.0.DenseReluDense.wo") is None
  assert hf_module_to_site("lm_head") is None


def _copy(adapters_dir, tmp_path, edit=None, task="task_a"):
  dst = tmp_path / f"copy_{task}"
  shutil.copytree(adapters_dir / task, dst)
  if edit is not None:
    cfg = json.load(open(dst / "adapter_config.json"))
    edit(cfg)
    json.dump(cfg, open(dst / "adapter_config.json", "w"))
  return dst


@pytest.mark.parametrize("edit,pattern", [
    (lambda c: c.pop("r"), r"adapter_config.json: field 'r' is missing"),
    (lambda c: c.pop("lora_alpha"), r"field 'lora_alpha' is missing"),
    (lambda c: c.update(use_dora=True), r"field 'use_dora'"),
    (lambda c: c.update(bias="all"), r"field 'bias' is 'all'"),
    (lambda c: c.update(rank_pattern={"q": 8}), r"field 'rank_pattern'"),
    (lambda c: c.update(alpha_pattern={"q": 8}), r"field 'alpha_pattern'"),
    (lambda c: c.update(peft_type="IA3"), r"field 'peft_type'"),
    (lambda c: c.update(r=8), r"disagree with adapter_config.json field 'r' = 8"),
    (lambda c: c.update(target_modules=["q", "k", "v", "o"]), r"field 'target_modules'"),
    (lambda c: c.update(target_modules=5), r"field 'target_modules' must be"),
])
def test_malformed_configs_are_refused(adapters_dir, tmp_path, edit, pattern):
  with pytest.raises(LibraryError, match=pattern):
    import_peft_adapter(str(_copy(adapters_dir, tmp_path, edit)))


def test_rslora_scale(adapters_dir, tmp_path):
  _, scale, info = import_peft_adapter(
      str(_copy(adapters_dir, tmp_path, lambda c: c.update(use_rslora=True))))
  assert scale == pytest.approx(8 / math.sqrt(4)) and info["use_rslora"]


def test_unknown_module_and_bin_refused(adapters_dir, tmp_path):
  from safetensors.numpy import save_file
  dst = _copy(adapters_dir, tmp_path)
  tensors = load_file(str(dst / "adapter_model.safetensors"))
  tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 24), np.float32)
  tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((96, 4), np.float32)
  save_file(tensors, str(dst / "adapter_model.safetensors"))
  with pytest.raises(LibraryError, match=r"adapter_model.safetensors: tensor .*lm_head.* not a T5 "
                     r"linear site"):
    import_peft_adapter(str(dst))
  os.remove(dst / "adapter_model.safetensors")
  (dst / "adapter_model.bin").write_bytes(b"\x80\x02pickle")
  with pytest.raises(LibraryError, match=r"adapter_model.bin: pickled .* safe_serialization"):
    import_peft_adapter(str(dst))
  os.remove(dst / "adapter_config.json")
  with pytest.raises(LibraryError, match="adapter_config.json is missing"):
    import_peft_adapter(str(dst))


def test_hf_module_to_site_checks_module_class():
  from phatgoose_jax.library import hf_module_to_site
  assert hf_module_to_site("decoder.block.2.layer.1.EncDecAttention.v") == (
      "decoder/layers_2/encoder_decoder_attention/value")
  assert hf_module_to_site("encoder.block.1.layer.1.DenseReluDense.wi_1") == "encoder/layers_1/mlp/wi_1"
  # A self-attention module where the cross-attention sub-layer sits is not a site.
  assert hf_module_to_site("decoder.block.1.layer.1.SelfAttention.q") is None
  assert hf_module_to_site("encoder.block.0.layer.1.DenseReluDense.q") is None
  assert hf_module_to_site("encoder.block.0.layer.0.SelfAttention.relative_attention_bias") is None
  assert hf_module_to_site("lm_head") is None
