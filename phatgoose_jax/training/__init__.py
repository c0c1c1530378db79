"""Training room: mesh and logical-axis rules, optimiser, the train loop, checkpoints and logs."""
from phatgoose_jax.training.optimizer import (OptimizerConfigError, adamw_optimizer, mask_frozen,
                                              num_warmup_steps, warmup_constant_schedule)
from phatgoose_jax.training.partitioning import (PartitioningError, create_mesh, global_batch,
                                                 host_data_shard, logical_axis_rules,
                                                 maybe_initialize_distributed, shardings_from_axes)
from phatgoose_jax.training.state import (Checkpointer, ExportError, ResumeError, export_adapters,
                                          load_exported_adapters, merge, split_trainable)
from phatgoose_jax.training.task_validation import make_task_eval_fn, validation_scores
from phatgoose_jax.training.trainer import FitResult, NonFiniteError, Trainer

__all__ = [
    "Checkpointer", "ExportError", "FitResult", "NonFiniteError", "OptimizerConfigError",
    "PartitioningError", "ResumeError", "Trainer", "adamw_optimizer", "create_mesh",
    "export_adapters", "global_batch", "host_data_shard", "load_exported_adapters",
    "logical_axis_rules", "make_task_eval_fn", "mask_frozen", "maybe_initialize_distributed", "merge",
    "num_warmup_steps", "shardings_from_axes", "split_trainable", "validation_scores",
    "warmup_constant_schedule",
]
