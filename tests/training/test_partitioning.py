"""Logical-axis rules table, mesh creation and logical -> mesh PartitionSpecs."""
import types

import jax
import pytest
from jax.sharding import PartitionSpec as P

from phatgoose_jax.training import partitioning as part

FAKE_MESH = types.SimpleNamespace(shape={"data": 4, "model": 2})


def test_rules_follow_t5x_standard_plus_expert_and_lora_rank():
  rules = dict(reversed(part.logical_axis_rules()))  # first rule wins -> keep the first
  expected = {"batch": "data", "vocab": "model", "mlp": "model", "heads": "model", "kv": None,
              "joined_kv": "model", "embed": None, "relpos_buckets": None, "length": None,
              "expert": "data", "lora_rank": None}
  for name, axis in expected.items():
    assert rules[name] == axis, name
  assert dict(part.logical_axis_rules(expert_axis=None))["expert"] is None
  assert dict(part.logical_axis_rules(expert_axis="model"))["expert"] == "model"
  with pytest.raises(ValueError, match="expert_axis"):
    part.logical_axis_rules(expert_axis="experts")


def test_mesh_spec_maps_logical_names_and_replicates_indivisible_dims():
  rules = part.logical_axis_rules()
  assert part.mesh_spec(("embed", "joined_kv"), (24, 24), FAKE_MESH, rules) == P(None, "model")
  assert part.mesh_spec(("expert", "embed", "lora_rank"), (4, 24, 3), FAKE_MESH, rules) == P(
      "data", None, None)
  # 3 heads cannot be split over 2 model shards: replicated instead of an error.
  assert part.mesh_spec(("heads", "relpos_buckets"), (3, 32), FAKE_MESH, rules) == P(None, None)
  assert part.mesh_spec(("expert", "embed"), (6, 24), FAKE_MESH, rules) == P(None, None)
  with pytest.raises(ValueError, match="do not match shape"):
    part.mesh_spec(("embed",), (2, 3), FAKE_MESH, rules)


def test_create_mesh_axes_and_errors():
  mesh = part.create_mesh(1)
  assert mesh.axis_names == ("data", "model") and mesh.shape["model"] == 1
  assert mesh.shape["data"] == jax.device_count()
  with pytest.raises(ValueError, match="num_partitions"):
    part.create_mesh(jax.device_count() + 1)


def test_multihost_initialisation_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv("COORDINATOR_ADDRESS", raising=False)
  assert not part.maybe_initialize_distributed(None) and not calls
  assert part.maybe_initialize_distributed(True) and calls == [1]
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  assert part.maybe_initialize_distributed(None) and calls == [1, 1]
  assert part.host_data_shard() == (0, 1)
