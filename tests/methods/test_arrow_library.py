"""Arrow library prototypes: stored vectors equal routing.arrow_prototypes per site, ranks and
scales do not matter, skip_existing leaves entries alone."""
import numpy as np
import pytest

from phatgoose_jax import routing as rt
from phatgoose_jax.library import ExpertLibrary, LibraryError
from phatgoose_jax.library.format import site_shapes
from phatgoose_jax.methods import arrow
from phatgoose_jax.models import tiny_config

CFG = tiny_config(num_encoder_layers=1, num_decoder_layers=1)
SITES = ["encoder/layers_0/attention/query", "encoder/layers_0/mlp/wo",
         "decoder/layers_0/encoder_decoder_attention/value"]


def _lora(seed, rank):
  rng = np.random.default_rng(seed)
  shapes = site_shapes(CFG)
  return {s: {"lora_a": rng.normal(size=(shapes[s][0], rank)).astype(np.float32),
              "lora_b": rng.normal(size=(rank, shapes[s][1])).astype(np.float32)} for s in SITES}


@pytest.fixture
def library(tmp_path):
  lib = ExpertLibrary.create(str(tmp_path / "lib"), "sha256:" + "0" * 64, CFG)
  lib.add("e0", _lora(0, 3), 1 / 3)
  lib.add("e1", _lora(1, 2), 0.7)   # different rank and scale
  lib.add("e2", _lora(2, 3), 1 / 3)
  return lib


def test_stored_vectors_equal_arrow_prototypes_per_site(library):
  done = arrow.compute_arrow_vectors(library)
  assert sorted(done) == ["e0", "e1", "e2"]
  stacked = library.stack(vectors="arrow")
  for site in SITES:
    want = np.asarray(rt.arrow_prototypes(stacked[site]["lora_a"], stacked[site]["lora_b"],
                                          method="explicit"))  # [E, D]
    np.testing.assert_allclose(stacked[site]["gates"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(stacked[site]["gates"], axis=1), 1.0, rtol=1e-5)
  # the prototype is the top left-singular direction of A @ B
  a, b = library.load("e1").lora[SITES[1]].values()
  u = np.linalg.svd(a @ b)[0][:, 0]
  got = library.load("e1").vectors["arrow"][SITES[1]]
  assert abs(abs(float(got @ u)) - 1.0) < 1e-4
  assert library.metadata("e1")["vector_provenance"]["arrow"]["method"] == "arrow"


def test_skip_existing_and_subset(library):
  first = arrow.compute_arrow_vectors(library, names=["e1"])
  assert list(first) == ["e1"]
  again = arrow.compute_arrow_vectors(library, skip_existing=True)
  assert sorted(again) == ["e0", "e2"]
  with pytest.raises(LibraryError, match="e9"):
    arrow.compute_arrow_vectors(library, names=["e9"])
  with pytest.raises(LibraryError, match="lora_a"):
    arrow.expert_arrow_vectors({"s": {"lora_a": np.zeros((2, 1))}})


def test_experts_of_equal_shapes_reuse_one_compiled_program():
  """A library of many experts compiles each (site shape, method) once, not once per expert."""
  arrow.expert_arrow_vectors(_lora(5, 4))
  before = arrow._prototypes._cache_size()  # pylint: disable=protected-access
  for seed in (6, 7):
    arrow.expert_arrow_vectors(_lora(seed, 4))
  assert arrow._prototypes._cache_size() == before  # pylint: disable=protected-access
