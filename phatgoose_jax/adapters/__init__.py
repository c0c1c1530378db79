"""What sits at one dense site of the T5.1.1 network: a LoRA expert, a PHATGOOSE-gated expert or
a routed library of experts (modules own parameters; routing math is `phatgoose_jax.routing`).

Adapter variables live in the ``adapters`` collection at the site's path, e.g.
``variables['adapters']['encoder']['layers_0']['attention']['query']['lora_a']``; the base
``params`` tree is that of the plain model.
"""
from phatgoose_jax.adapters.collect import site_token_side
from phatgoose_jax.adapters.factory import DEFAULT_SITE_PATTERN
from phatgoose_jax.adapters.factory import MODES
from phatgoose_jax.adapters.factory import AdapterConfig
from phatgoose_jax.adapters.factory import AdapterSiteFactory
from phatgoose_jax.adapters.factory import build_model
from phatgoose_jax.adapters.factory import init_variables
from phatgoose_jax.adapters.factory import make_site_factory
from phatgoose_jax.adapters.factory import site_names
from phatgoose_jax.adapters.factory import trainable_mask
from phatgoose_jax.adapters.gate import GatedLoraSite
from phatgoose_jax.adapters.lora import LoraSite
from phatgoose_jax.adapters.lora import lora_delta
from phatgoose_jax.adapters.routed import ROUTERS
from phatgoose_jax.adapters.routed import RoutedLoraSite

__all__ = [
    "DEFAULT_SITE_PATTERN",
    "MODES",
    "ROUTERS",
    "AdapterConfig",
    "AdapterSiteFactory",
    "GatedLoraSite",
    "LoraSite",
    "RoutedLoraSite",
    "build_model",
    "init_variables",
    "lora_delta",
    "make_site_factory",
    "site_names",
    "site_token_side",
    "trainable_mask",
]
