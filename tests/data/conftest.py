"""Shared fixtures for the data tests: one tiny vocabulary per session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from phatgoose_jax.data import synthetic
from phatgoose_jax.data import vocab as vocab_lib

SMALL_SPLITS = {"train": 48, "validation": 16, "test": 16}


@pytest.fixture(scope="session")
def corpus():
  return synthetic.synthetic_corpus(300, seed=0)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory, corpus):
  path = tmp_path_factory.mktemp("vocab") / "synthetic.model"
  vocab_lib.build_sentencepiece_model(corpus, path, vocab_size=96)
  return str(path)


@pytest.fixture(scope="session")
def vocabulary(sp_model_path):
  return vocab_lib.get_vocabulary(sp_model_path)


@pytest.fixture(scope="session")
def synthetic_tasks(vocabulary):
  """Registers the synthetic tasks (small splits) once; returns their names."""
  return synthetic.register_synthetic_tasks(vocabulary, num_examples=SMALL_SPLITS)
