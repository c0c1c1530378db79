"""Shared test fixtures: paths to the reference fixtures shipped under tests/testdata."""
import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TESTDATA = pathlib.Path(__file__).parent / "testdata"
REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="session")
def testdata() -> pathlib.Path:
  return TESTDATA


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO
