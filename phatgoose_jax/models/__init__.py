"""The base T5.1.1 model: config, network, decoding and scoring (knows nothing of experts)."""
from phatgoose_jax.models.config import T5Config, tiny_config
from phatgoose_jax.models.decoding import greedy_decode, init_cache
from phatgoose_jax.models.layers import DenseSite, SiteSpec, SiteFactory, dense_site
from phatgoose_jax.models.scoring import cross_entropy_loss, score_batch, sequence_scores
from phatgoose_jax.models.transformer import Transformer

__all__ = [
    "T5Config", "tiny_config", "Transformer", "greedy_decode", "init_cache", "score_batch",
    "sequence_scores", "cross_entropy_loss", "DenseSite", "SiteSpec", "SiteFactory", "dense_site",
]
