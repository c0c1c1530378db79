"""End to end: PEFT adapters imported into the library reproduce HF/PEFT logits (expected.npz).

Two paths: each adapter as a single LoRA expert (mode 'lora'), and all three stacked from an
`ExpertLibrary` and selected per example with one-hot 'example_weights' (mode 'routed').
Logits are compared at non-pad label positions (README: HF's decoder uses the causal mask only).
"""
import jax
import numpy as np
import pytest

from phatgoose_jax.adapters import AdapterConfig, build_model
from phatgoose_jax.checkpoints import load_checkpoint, params_fingerprint
from phatgoose_jax.library import ExpertLibrary, import_peft_adapter, to_adapters_tree

TASKS = ("task_a", "task_b", "task_c")
ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture(testdata):
  root = testdata / "hf_t5_1_1_tiny"
  config, params = load_checkpoint(str(root / "model"),
                                   config_overrides={"dtype": "float32", "dropout_rate": 0.0})
  batch = dict(np.load(root / "batch.npz"))
  expected = dict(np.load(root / "expected.npz"))
  return root, config, params, batch, expected


_JITTED = {}


def _logits(model, variables, batch, site_inputs=None):
  """Teacher-forced logits; one compiled function per model (site_inputs are traced args)."""
  if model not in _JITTED:
    _JITTED[model] = jax.jit(lambda v, e, d, t, s: model.apply(v, e, d, t, enable_dropout=False,
                                                               site_inputs=s))
  return np.asarray(_JITTED[model](variables, batch["input_ids"], batch["decoder_input_ids"],
                                   batch["labels"], site_inputs))


@pytest.mark.parametrize("task", TASKS)
def test_single_lora_matches_peft_logits(fixture, task):
  root, config, params, batch, expected = fixture
  lora, scale, _ = import_peft_adapter(str(root / "adapters" / task))
  model = build_model(config, AdapterConfig(mode="lora", rank=4, scale=scale))
  logits = _logits(model, {"params": params, "adapters": to_adapters_tree(lora)}, batch)
  valid = batch["labels"] != 0  # [B, T]
  diff = np.abs(logits - expected[f"logits_task_{task[-1]}"])[valid]
  assert diff.max() < ATOL, diff.max()
  # The adapter matters: the base logits are far away (a wrong import would not pass).
  assert np.abs(logits - expected["base_logits"])[valid].max() > 1.0


def test_library_stack_routed_one_hot_matches_peft_logits(fixture, tmp_path):
  root, config, params, batch, expected = fixture
  lib = ExpertLibrary.create(str(tmp_path / "lib"), params_fingerprint(params), config)
  for task in TASKS:
    lora, scale, info = import_peft_adapter(str(root / "adapters" / task))
    lib.add(task, lora, scale, task=task, provenance=info)
  stacked = lib.stack(vectors=None)
  for site in stacked:  # 'example_weights' routing ignores the router vectors.
    stacked[site]["gates"] = np.zeros(stacked[site]["lora_a"].shape[:2], np.float32)
  model = build_model(config, AdapterConfig(mode="routed", rank=4, num_experts=3,
                                            router="example_weights", backend="dense"))
  variables = {"params": params, "adapters": to_adapters_tree(stacked)}
  valid = batch["labels"] != 0
  for e, task in enumerate(TASKS):
    weights = np.zeros((batch["input_ids"].shape[0], 3), np.float32)
    weights[:, e] = 1.0
    logits = _logits(model, variables, batch, {"expert_weights": weights})
    diff = np.abs(logits - expected[f"logits_task_{task[-1]}"])[valid]
    assert diff.max() < ATOL, (task, diff.max())
