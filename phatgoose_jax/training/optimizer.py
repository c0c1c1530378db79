"""The PHATGOOSE optimiser: AdamW, linear warmup then constant, global-norm clipping.

Settings follow the official code (r-three/phatgoose, ``colm/experiments/train.gin`` and
``src/procedures/utils/optimizer_scheduler.py``): torch ``AdamW`` with lr 5e-3, betas (0.9, 0.999),
eps 1e-8 and **weight_decay 0.0**; scheduler ``constant_with_warmup`` with ``warmup_ratio = 0.06``
(``num_warmup_steps = int(num_steps * 0.06)``, lr factor ``step / num_warmup_steps`` before it, 1
after, so the very first update has lr 0); ``gradient_clipping = 1.0`` (global norm of the
trainable parameters) and 1000 steps for an expert (the paper, Sec. 4: "1000 steps", gates 100).

The optimiser only ever sees the trainable leaves: the `Trainer` splits the variables into a
trainable tree (given to ``tx.init`` / ``tx.update``) and a frozen remainder, so frozen leaves get no
optimiser state and no update at all. `mask_frozen` is the equivalent for callers that keep one
full tree (``optax.multi_transform`` with ``set_to_zero`` on frozen leaves, which carry no state).

Gradient accumulation (t5x's ``num_microbatches``; the official ``gradient_accumulation_factor``)
lives in the trainer's step: the global batch of ``BATCH_SIZE`` rows is split into M microbatches
whose gradients are averaged before one optimiser update, so the *effective* batch is BATCH_SIZE and
each forward pass sees BATCH_SIZE / M rows.
"""
from __future__ import annotations

from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp
import optax


class OptimizerConfigError(ValueError):
  """An optimiser setting is out of range (names the setting)."""


def num_warmup_steps(total_steps: int, warmup_ratio: Optional[float] = 0.06,
                     warmup_steps: Optional[int] = None) -> int:
  """``warmup_steps`` if given, else ``int(total_steps * warmup_ratio)`` (official rounding)."""
  if warmup_steps is not None:
    if warmup_steps < 0:
      raise OptimizerConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return int(warmup_steps)
  if warmup_ratio is None:
    return 0
  if not 0.0 <= warmup_ratio <= 1.0:
    raise OptimizerConfigError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
  return int(total_steps * warmup_ratio)


@gin.configurable(module="phatgoose_jax.training")
def warmup_constant_schedule(learning_rate: float = 5e-3, total_steps: int = 1000,
                             warmup_ratio: Optional[float] = 0.06,
                             warmup_steps: Optional[int] = None) -> optax.Schedule:
  """lr(count) = learning_rate * min(count / W, 1), W = warmup steps (HF constant_with_warmup).

  ``count`` is the number of updates already applied, so the first update uses lr(0) = 0 when
  W > 0, exactly as the official LambdaLR stepped after each optimiser step.
  """
  if learning_rate <= 0:
    raise OptimizerConfigError(f"learning_rate must be > 0, got {learning_rate}")
  if total_steps < 1:
    raise OptimizerConfigError(f"total_steps must be >= 1, got {total_steps}")
  w = num_warmup_steps(total_steps, warmup_ratio, warmup_steps)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    if w == 0:
      return jnp.full_like(count, learning_rate)
    return learning_rate * jnp.minimum(count / w, 1.0)

  return schedule


@gin.configurable(module="phatgoose_jax.training")
def adamw_optimizer(learning_rate: float = 5e-3, total_steps: int = 1000,
                    warmup_ratio: Optional[float] = 0.06, warmup_steps: Optional[int] = None,
                    weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, clip_norm: Optional[float] = 1.0,
                    schedule: Optional[optax.Schedule] = None) -> optax.GradientTransformation:
  """Global-norm clip (1.0) then AdamW with decoupled weight decay, as torch ``AdamW``.

  Args:
    learning_rate: peak lr (PHATGOOSE: 5e-3 for LoRA experts and gates).
    total_steps: steps of the run (for ``warmup_ratio``).
    warmup_ratio / warmup_steps: see `warmup_constant_schedule`.
    weight_decay: decoupled decay (official: 0.0). Applied to every trainable leaf.
    b1, b2, eps: Adam moments (torch defaults, as the official code).
    clip_norm: max global L2 norm of the gradients of the trainable leaves; None disables.
    schedule: overrides the lr schedule entirely.
  Returns:
    An ``optax.GradientTransformation`` (with ``inject_hyperparams``-free, checkpointable state).
  """
  if weight_decay < 0:
    raise OptimizerConfigError(f"weight_decay must be >= 0, got {weight_decay}")
  if clip_norm is not None and clip_norm <= 0:
    raise OptimizerConfigError(f"clip_norm must be > 0 or None, got {clip_norm}")
  if schedule is None:
    schedule = warmup_constant_schedule(learning_rate, total_steps, warmup_ratio, warmup_steps)
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


def mask_frozen(tx: optax.GradientTransformation, trainable_mask: Any) -> optax.GradientTransformation:
  """``tx`` on leaves where ``trainable_mask`` is True, zero updates and no state elsewhere."""
  labels = jax.tree.map(lambda m: "train" if bool(m) else "frozen", trainable_mask)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

