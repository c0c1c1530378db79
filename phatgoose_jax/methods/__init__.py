"""Baseline methods with their own training logic (see docs of each module).

`polytropon`: Poly / MHR (task-routed LoRA skill inventories, few-shot adaptation).
`task_moe`: task-level mixture-of-experts (Ye et al. 2022) and the ARG metric.
"""
from phatgoose_jax.methods import polytropon
from phatgoose_jax.methods import task_moe
from phatgoose_jax.methods.polytropon import (
    PolyAdaptConfig, PolySite, PolytroponConfig, adapt_to_new_task, add_task_rows,
    make_poly_site_factory, merge_skills, poly_optimizer)
from phatgoose_jax.methods.task_moe import (
    TaskMoEConfig, TaskMoERouter, TaskMoESite, average_relative_gain, make_task_moe_site_factory,
    temperature_schedule)

__all__ = [
    "polytropon", "task_moe",
    "PolytroponConfig", "PolyAdaptConfig", "PolySite", "make_poly_site_factory", "poly_optimizer",
    "adapt_to_new_task", "add_task_rows", "merge_skills",
    "TaskMoEConfig", "TaskMoERouter", "TaskMoESite", "make_task_moe_site_factory",
    "temperature_schedule", "average_relative_gain",
]
from phatgoose_jax.methods import arrow
from phatgoose_jax.methods import average_activation
from phatgoose_jax.methods import dfwe
from phatgoose_jax.methods import oracle
from phatgoose_jax.methods import retrieval
