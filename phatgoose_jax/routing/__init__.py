"""Pure routing math: scores (PHATGOOSE, Arrow, uniform, one-hot), top-k and routed LoRA.

No Flax modules and no files here; ``adapters/`` builds site modules on top of these functions.
"""
from phatgoose_jax.routing.arrow import ARROW_VARIANTS
from phatgoose_jax.routing.arrow import arrow_prototypes
from phatgoose_jax.routing.arrow import arrow_route
from phatgoose_jax.routing.backends import BACKENDS
from phatgoose_jax.routing.backends import auto_backend
from phatgoose_jax.routing.backends import choose_backend
from phatgoose_jax.routing.backends import routed_lora
from phatgoose_jax.routing.scores import PHATGOOSE_LN_EPS
from phatgoose_jax.routing.scores import PHATGOOSE_TOPK_EPS
from phatgoose_jax.routing.scores import one_hot_routing
from phatgoose_jax.routing.scores import phatgoose_route
from phatgoose_jax.routing.scores import standardize
from phatgoose_jax.routing.scores import top_k_routing
from phatgoose_jax.routing.scores import uniform_routing
from phatgoose_jax.routing.topk import top_k
from phatgoose_jax.routing.types import Routing
from phatgoose_jax.routing.types import RoutingError

__all__ = [
    "ARROW_VARIANTS",
    "BACKENDS",
    "PHATGOOSE_LN_EPS",
    "PHATGOOSE_TOPK_EPS",
    "Routing",
    "RoutingError",
    "arrow_prototypes",
    "arrow_route",
    "auto_backend",
    "choose_backend",
    "one_hot_routing",
    "phatgoose_route",
    "routed_lora",
    "standardize",
    "top_k",
    "top_k_routing",
    "uniform_routing",
]
