"""Session fixtures of the reliability tests: the shared inputs of `rel_world.build_world`."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import rel_world  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
  """Paths of the session inputs (tiny HF base, libraries, exports, PEFT adapters, task module)."""
  return rel_world.build_world(str(tmp_path_factory.mktemp("world")))
