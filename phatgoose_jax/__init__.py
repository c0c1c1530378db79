"""phatgoose_jax: recycle LoRA experts and route among them (PHATGOOSE and its baselines) on T5.

Curated public API. Submodules: `models` (T5.1.1), `checkpoints` (T5X/Orbax/HF readers),
`routing` (pure routing math), `adapters` (site modules), `library` (expert library),
`merging`, `data` (seqio tasks), `training`, `evaluation`, `methods`.
"""
from phatgoose_jax.models import T5Config, Transformer, greedy_decode, score_batch, tiny_config

__version__ = "0.1.0"


def load_checkpoint(path, config=None):
  """Load a T5X (legacy or Orbax), HF T5 or phatgoose_jax checkpoint -> (T5Config, params)."""
  from phatgoose_jax.checkpoints import load_checkpoint as _load
  return _load(path, config)


__all__ = ["T5Config", "Transformer", "greedy_decode", "score_batch", "tiny_config",
           "load_checkpoint", "__version__"]
