"""Shared fixtures of the evaluation tests: a tiny routed T5 with random experts, a vocabulary."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import dataclasses

import jax
import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax.models import tiny_config

E, K, R = 5, 2, 3
CFG = tiny_config()
ROUTED = ad.AdapterConfig(mode="routed", num_experts=E, top_k=K, rank=R, router="phatgoose")


def randomize_adapters(variables, seed=1, scale=0.5):
  """Random non-zero lora_a/lora_b/gates (zero-init lora_b would hide the routing)."""
  leaves, treedef = jax.tree_util.tree_flatten(variables["adapters"])
  rng = np.random.default_rng(seed)
  new = []
  for leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) == 1:  # scale [E]
      new.append(np.full(shape, 1.0, np.float32))
    else:
      new.append((scale * rng.standard_normal(shape)).astype(np.float32))
  return {**variables, "adapters": jax.tree_util.tree_unflatten(treedef, new)}


def build(adapter_config):
  model = ad.build_model(CFG, adapter_config)
  variables = ad.init_variables(model, jax.random.PRNGKey(0))
  return model, randomize_adapters(variables)


@pytest.fixture(scope="session")
def routed():
  """(model, variables) of a PHATGOOSE-routed tiny T5 with 5 random experts."""
  return build(ROUTED)


@pytest.fixture(scope="session")
def example_weights_routed(routed):
  """Same variables, router 'example_weights' (site_inputs['expert_weights'] [B, E])."""
  model = ad.build_model(CFG, dataclasses.replace(ROUTED, router="example_weights"))
  return model, routed[1]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
  from phatgoose_jax.data import synthetic, vocab  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("vocab") / "synthetic.model"
  vocab.build_sentencepiece_model(synthetic.synthetic_corpus(300, seed=0), path,
                                  vocab_size=CFG.vocab_size)
  return str(path)


@pytest.fixture(scope="session")
def sp_processor(sp_model_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor()
  sp.Load(sp_model_path)
  assert sp.GetPieceSize() <= CFG.vocab_size
  return sp
