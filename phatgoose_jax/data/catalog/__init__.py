"""Dataset catalogs PHATGOOSE's seqio tasks are registered from (pure data).

Modules: `p3` (36 T0 held-in experts), `t0_heldout` (11 held-out evaluations),
`flan` (166 FLAN-setting experts; `flan_gen_lengths` their validation decoding budgets),
`bigbench` (22 BBH + 17 BBL tasks). Sources
and unverified entries are listed in docs/datasets.md.
"""

from phatgoose_jax.data.catalog.bigbench import BBH_TASKS
from phatgoose_jax.data.catalog.bigbench import BBL_TASKS
from phatgoose_jax.data.catalog.bigbench import BigBenchTask
from phatgoose_jax.data.catalog.bigbench import all_bbh_names
from phatgoose_jax.data.catalog.bigbench import all_bbl_names
from phatgoose_jax.data.catalog.bigbench import bigbench_task
from phatgoose_jax.data.catalog.flan import FLAN_EXPERTS
from phatgoose_jax.data.catalog.flan import FlanExpertSpec
from phatgoose_jax.data.catalog.flan import all_flan_keys
from phatgoose_jax.data.catalog.flan import flan_expert
from phatgoose_jax.data.catalog.flan import flan_experts_in_group
from phatgoose_jax.data.catalog.flan_gen_lengths import FLAN_EVAL_MAX_GEN_LENGTH
from phatgoose_jax.data.catalog.p3 import MAX_EXAMPLES_PER_DATASET
from phatgoose_jax.data.catalog.p3 import P3_DATASETS
from phatgoose_jax.data.catalog.p3 import CatalogLookupError
from phatgoose_jax.data.catalog.p3 import DatasetSpec
from phatgoose_jax.data.catalog.p3 import all_p3_keys
from phatgoose_jax.data.catalog.p3 import all_p3_templates
from phatgoose_jax.data.catalog.p3 import p3_config_name
from phatgoose_jax.data.catalog.p3 import p3_dataset
from phatgoose_jax.data.catalog.t0_heldout import T0_HELDOUT
from phatgoose_jax.data.catalog.t0_heldout import HeldoutSpec
from phatgoose_jax.data.catalog.t0_heldout import all_heldout_keys
from phatgoose_jax.data.catalog.t0_heldout import heldout_dataset
