"""Atomically written checkpoints, library entries and reports get umask permissions, not the
0700 / 0600 of their temporary siblings (so a team's group can read them)."""
import os
import stat

import numpy as np
import pytest

from phatgoose_jax import fileperm
from phatgoose_jax.checkpoints import load_checkpoint, save_checkpoint
from phatgoose_jax.library import ExpertLibrary
from phatgoose_jax.library.format import site_shapes

LEGACY = os.path.join(os.path.dirname(__file__), "testdata", "t5x_t5_1_1_tiny", "legacy")


@pytest.fixture
def umask_027():
  old = os.umask(0o027)
  yield 0o027
  os.umask(old)


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_the_process_umask(umask_027):
  assert fileperm.current_umask() == 0o027


def test_checkpoint_and_library_entry_modes_follow_the_umask(tmp_path, umask_027):
  cfg, params = load_checkpoint(LEGACY)
  target = str(tmp_path / "ckpt")
  save_checkpoint(target, params, cfg)
  assert _mode(target) == 0o750
  lib = ExpertLibrary.create(str(tmp_path / "lib"), "sha256:" + "0" * 64, cfg)
  rng = np.random.default_rng(0)
  site, (d, f) = next(iter(site_shapes(cfg).items()))
  lib.add("e0", {site: {"lora_a": rng.normal(size=(d, 2)).astype(np.float32),
                        "lora_b": rng.normal(size=(2, f)).astype(np.float32)}}, 0.5)
  entry = os.path.join(lib.experts_dir, "e0")
  assert _mode(entry) == 0o750
  assert {_mode(os.path.join(entry, n)) for n in os.listdir(entry)} == {0o640}
  assert _mode(os.path.join(lib.path, "library.json")) == 0o640
