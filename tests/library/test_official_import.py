"""Official PHATGOOSE (r-three/phatgoose) best.pt import, on synthetic torch state dicts."""
import sys

import numpy as np
import pytest

from phatgoose_jax.library import (ExpertLibrary, LibraryError, import_phatgoose_checkpoint,
                                   import_phatgoose_experts, site_shapes)
from phatgoose_jax.models.config import tiny_config

CONFIG = tiny_config(emb_dim=13, num_heads=3, head_dim=5, mlp_dim=7, num_encoder_layers=1,
                     num_decoder_layers=2)
SHAPES = site_shapes(CONFIG)

# HF T5 module names written out by hand (independent of the importer's mapping table).
HF_NAMES = {
    "encoder/layers_0/attention/query": "encoder.block.0.layer.0.SelfAttention.q",
    "encoder/layers_0/attention/key": "encoder.block.0.layer.0.SelfAttention.k",
    "encoder/layers_0/attention/value": "encoder.block.0.layer.0.SelfAttention.v",
    "encoder/layers_0/attention/out": "encoder.block.0.layer.0.SelfAttention.o",
    "encoder/layers_0/mlp/wi_0": "encoder.block.0.layer.1.DenseReluDense.wi_0",
    "encoder/layers_0/mlp/wi_1": "encoder.block.0.layer.1.DenseReluDense.wi_1",
    "encoder/layers_0/mlp/wo": "encoder.block.0.layer.1.DenseReluDense.wo",
}
for _i in range(2):
  for _t5x, _hf in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
    HF_NAMES[f"decoder/layers_{_i}/self_attention/{_t5x}"] = (
        f"decoder.block.{_i}.layer.0.SelfAttention.{_hf}")
    HF_NAMES[f"decoder/layers_{_i}/encoder_decoder_attention/{_t5x}"] = (
        f"decoder.block.{_i}.layer.1.EncDecAttention.{_hf}")
  for _leaf in ("wi_0", "wi_1", "wo"):
    HF_NAMES[f"decoder/layers_{_i}/mlp/{_leaf}"] = (
        f"decoder.block.{_i}.layer.2.DenseReluDense.{_leaf}")


def test_missing_torch_gives_install_hint(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  with pytest.raises(ImportError, match=r"pip install phatgoose_jax\[torch\]"):
    import_phatgoose_checkpoint(str(tmp_path / "best.pt"))


def _experts(n, rank=4, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    out.append({s: (rng.normal(size=(d, rank)).astype(np.float32),
                    rng.normal(size=(rank, f)).astype(np.float32),
                    rng.normal(size=(d,)).astype(np.float32)) for s, (d, f) in SHAPES.items()})
  return out


def _save(torch, path, experts, with_router=True, input_gate=False, dtype=None):
  state = {"encoder.embed_tokens.weight": torch.zeros(96, 13),
           "decoder.embed_tokens.weight": torch.zeros(96, 13)}
  for i, expert in enumerate(experts):
    for site, (a, b, g) in expert.items():
      m = HF_NAMES[site]
      state[f"{m}._addons.expert_lora.layer1__{i}"] = torch.from_numpy(a)
      state[f"{m}._addons.expert_lora.layer2__{i}"] = torch.from_numpy(b)
      if with_router:
        state[f"{m}._addons.router.expert_embeddings__{i}"] = torch.from_numpy(g)
      if input_gate:
        state[f"{m}._addons.expert_lora.expert_input_gate"] = torch.from_numpy(g)
  if dtype is not None:
    state = {k: v.to(dtype) for k, v in state.items()}
  torch.save(state, str(path))
  return str(path)


def test_import_concatenated_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  experts = _experts(3)
  path = _save(torch, tmp_path / "best.pt", experts)
  imported = import_phatgoose_experts(path)
  assert list(imported) == [0, 1, 2]
  for i, expert in enumerate(experts):
    lora, scale, gates, info = imported[i]
    assert scale == 0.25 and info["expert_index"] == i and info["rank"] == 4
    assert info["gate_source"] == "router.expert_embeddings"
    assert list(lora) == list(SHAPES)
    for site, (a, b, g) in expert.items():
      np.testing.assert_array_equal(lora[site]["lora_a"], a)  # layer1 is already [D, R]
      np.testing.assert_array_equal(lora[site]["lora_b"], b)
      np.testing.assert_array_equal(gates[site], g)
  lora, _, _, _ = import_phatgoose_checkpoint(path, expert_index=1)
  np.testing.assert_array_equal(lora["decoder/layers_1/mlp/wo"]["lora_b"],
                                experts[1]["decoder/layers_1/mlp/wo"][1])
  with pytest.raises(LibraryError, match=r"holds 3 experts \[0, 1, 2\]; pass expert_index"):
    import_phatgoose_checkpoint(path)
  with pytest.raises(LibraryError, match=r"expert_index 7 not found; available \[0, 1, 2\]"):
    import_phatgoose_checkpoint(path, expert_index=7)


def test_single_expert_with_input_gate_into_library(tmp_path):
  torch = pytest.importorskip("torch")
  experts = _experts(1, rank=3, seed=1)
  path = _save(torch, tmp_path / "best.pt", experts, with_router=False, input_gate=True)
  lora, scale, gates, info = import_phatgoose_checkpoint(path)
  assert info["gate_source"] == "expert_lora.expert_input_gate" and scale == pytest.approx(1 / 3)
  lib = ExpertLibrary.create(str(tmp_path / "lib"), "sha256:" + "22" * 32, CONFIG)
  lib.add("official0", lora, scale, gates=gates, provenance=info)
  stacked = lib.stack()
  site = "encoder/layers_0/attention/out"
  a, b, g = experts[0][site]
  x = np.random.default_rng(2).normal(size=(5, 15)).astype(np.float32)
  s = stacked[site]
  np.testing.assert_allclose((x @ s["lora_a"][0]) @ s["lora_b"][0] * s["scale"][0],
                             (x @ a) @ b / 3, rtol=1e-6)  # official FFNExperts forward
  np.testing.assert_array_equal(s["gates"][0], g)
  assert lib.metadata("official0")["provenance"]["import_kind"] == "phatgoose_official"


def test_bfloat16_checkpoint_and_no_gates(tmp_path):
  torch = pytest.importorskip("torch")
  experts = _experts(2, seed=3)
  path = _save(torch, tmp_path / "best.pt", experts, with_router=False, dtype=torch.bfloat16)
  lora, _, gates, _ = import_phatgoose_checkpoint(path, expert_index=0)
  assert gates is None
  got = lora["encoder/layers_0/mlp/wi_0"]["lora_a"]
  want = torch.from_numpy(experts[0]["encoder/layers_0/mlp/wi_0"][0]).bfloat16().float().numpy()
  assert got.dtype.name == "bfloat16"
  np.testing.assert_array_equal(got.astype(np.float32), want)


def test_malformed_checkpoints(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"encoder.block.0.layer.0.SelfAttention.q._addons.expert_lora.weird__0":
              torch.zeros(13, 4)}, str(tmp_path / "weird.pt"))
  with pytest.raises(LibraryError, match=r"weird.pt: addon tensor .*weird__0"):
    import_phatgoose_checkpoint(str(tmp_path / "weird.pt"))
  torch.save({"shared.weight": torch.zeros(3, 3)}, str(tmp_path / "base.pt"))
  with pytest.raises(LibraryError, match=r"no '._addons.expert_lora.layer1__<i>' tensors"):
    import_phatgoose_checkpoint(str(tmp_path / "base.pt"))
  experts = _experts(1)
  state = {}
  for site, (a, _, _) in experts[0].items():
    state[f"{HF_NAMES[site]}._addons.expert_lora.layer1__0"] = torch.from_numpy(a)
  torch.save(state, str(tmp_path / "half.pt"))
  with pytest.raises(LibraryError, match=r"needs layer1 and layer2"):
    import_phatgoose_checkpoint(str(tmp_path / "half.pt"))
  with pytest.raises(LibraryError, match="does not exist"):
    import_phatgoose_checkpoint(str(tmp_path / "nope.pt"))


def test_a1_stack_router_is_skipped_and_reported(tmp_path):
  """Official A1 layout: per-site routers in the encoder, one router for the whole decoder."""
  torch = pytest.importorskip("torch")
  experts = _experts(2)
  path = _save(torch, tmp_path / "a1.pt", experts)
  state = torch.load(path, weights_only=True)
  for key in [k for k in state if k.startswith("decoder.") and "router" in k]:
    del state[key]
  for i in range(2):
    state[f"decoder._addons.router.expert_embeddings__{i}"] = torch.ones(13)
  torch.save(state, path)
  got = import_phatgoose_checkpoint(path, expert_index=1)
  lora, scale, gates, info = got
  for site, (a, b, _) in experts[1].items():
    np.testing.assert_array_equal(lora[site]["lora_a"], a)
    np.testing.assert_array_equal(lora[site]["lora_b"], b)
  assert gates is None and info["gate_source"] is None
  assert info["stack_routers"] == ["decoder"]


def test_cli_library_add_official(tmp_path, capsys):
  """`phatgoose-jax library add LIB NAME --official best.pt [--expert-index I]`."""
  torch = pytest.importorskip("torch")
  from phatgoose_jax import cli  # pylint: disable=g-import-not-at-top
  experts = _experts(3, rank=3, seed=4)
  path = _save(torch, tmp_path / "best.pt", experts, with_router=True)
  lib = ExpertLibrary.create(str(tmp_path / "lib"), "sha256:" + "22" * 32, CONFIG)
  assert cli.main(["library", "add", lib.path, "e1", "--official", path,
                   "--expert-index", "1"]) == 0, capsys.readouterr().err
  want, _, _, _ = import_phatgoose_checkpoint(path, expert_index=1)
  got = ExpertLibrary.open(lib.path).load("e1").lora
  for site, leaves in want.items():
    np.testing.assert_array_equal(got[site]["lora_a"], leaves["lora_a"])
  assert cli.main(["library", "add", lib.path, "e2", "--official", path]) == 2  # 3 experts
  assert "pass expert_index" in capsys.readouterr().err
