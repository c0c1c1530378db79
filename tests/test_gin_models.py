"""Every gin/models preset parses, finalizes and builds a T5Config with t5x's dims."""
import pathlib

import gin
import pytest

from phatgoose_jax.models import T5Config

GIN_DIR = pathlib.Path(__file__).parent.parent / "gin"
PRESETS = sorted(p.name for p in (GIN_DIR / "models").glob("*.gin"))

EXPECTED = {  # emb, heads, enc layers, mlp (t5x/examples/t5/t5_1_1/*.gin)
    "small": (512, 6, 8, 1024), "base": (768, 12, 12, 2048), "large": (1024, 16, 24, 2816),
    "xl": (2048, 32, 24, 5120), "xxl": (4096, 64, 24, 10240), "tiny": (24, 3, 2, 40),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_model_preset_builds(preset):
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_DIR))
    gin.parse_config_files_and_bindings([str(GIN_DIR / "models" / preset)], [], finalize_config=True)
    config = T5Config()
    size = preset[:-len(".gin")].split("_")[-1]
    emb, heads, layers_, mlp = EXPECTED[size]
    assert (config.emb_dim, config.num_heads, config.num_encoder_layers, config.mlp_dim) == (
        emb, heads, layers_, mlp)
    assert config.head_dim == (8 if size == "tiny" else 64)
    if "lm100k" in preset:
      assert "lm100k" in gin.query_parameter("%INITIAL_CHECKPOINT_PATH")
  finally:
    gin.clear_config()
