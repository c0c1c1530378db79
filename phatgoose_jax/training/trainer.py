"""The train loop: jitted, sharded train/eval steps over frozen base params and trainable adapters.

`Trainer` is method-agnostic: it receives a Flax model (a `phatgoose_jax.models.Transformer`, usually
built by `phatgoose_jax.adapters.build_model`), its variables (``params`` + ``params_axes`` for the
frozen base, ``adapters`` + ``adapters_axes`` for the adapter collection) and a boolean mask over the
``adapters`` tree saying which leaves train (PHATGOOSE expert: ``lora_a``/``lora_b``; gate training:
``gate`` only). The base ``params`` never train; they can be stored in bfloat16 (``base_dtype``), as
the official recipe keeps the frozen T5 in bf16.

Step semantics (one call of the jitted step = one optimiser update):
  * the global batch [B, ...] (BATCH_SIZE rows, the effective batch) is split into M microbatches
    (``num_microbatches``; microbatch m holds rows m, m+M, ... so every data shard contributes);
  * loss = token-mean cross entropy of each microbatch (`phatgoose_jax.models.cross_entropy_loss`);
    gradients of the microbatches are averaged with equal weights, as the official
    ``loss / gradient_accumulation_factor`` (``loss_normalization='microbatch_mean'``), or weighted
    by their token counts (``'tokens'``: identical to one pass over the whole batch);
  * dropout is on, with the ``dropout`` rng = fold_in(fold_in(key, step), microbatch);
  * the update is applied only if the loss and all gradients are finite; otherwise the state is
    returned unchanged and `fit` stops with `NonFiniteError` (the last checkpoint stays good).

`fit` adds Orbax checkpoints and resume (`state.Checkpointer`), validation with best selection
(step 0 included unless ``validate_at_start=False``, as the official expert recipe evaluates
before training and its gate recipe does not), export of the best adapters,
logs (`logging.MetricsLogger`) and SIGTERM/SIGINT handling (save, then return ``interrupted``).

Letters: B batch, M microbatches, L encoder length, T target length, V vocab.
"""
from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence

from flax.core import unfreeze
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from phatgoose_jax.models.scoring import cross_entropy_loss
from phatgoose_jax.training import partitioning
from phatgoose_jax.training import state as state_lib
from phatgoose_jax.training.logging import MetricsLogger

Batch = Mapping[str, Any]
BATCH_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


class NonFiniteError(RuntimeError):
  """The loss or a gradient became NaN/inf; training stopped without applying that update."""


@dataclasses.dataclass
class FitResult:
  """What `Trainer.fit` returns."""
  state: Dict[str, Any]
  step: int
  best: Optional[Dict[str, Any]]
  interrupted: Optional[int] = None      # the signal number if stopped by SIGTERM/SIGINT
  last_train_metrics: Optional[Dict[str, float]] = None


def _iter_method(it: Any, names: Sequence[str]) -> Optional[Callable]:
  """The first callable attribute of ``it`` among ``names`` (data iterators' resume API)."""
  for name in names:
    fn = getattr(it, name, None)
    if callable(fn):
      return fn
  return None


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Trainer:
  """Jitted, sharded training of the adapter leaves selected by ``trainable_mask``.

  Args:
    model: Flax module called as ``model.apply({'params', 'adapters'}, enc, dec_in, dec_tgt,
      enable_dropout=..., site_inputs=...)`` -> logits [B, T, V].
    trainable_mask: bool tree with the structure of the ``adapters`` collection.
    optimizer: an optax transformation (applied to the trainable leaves only).
    mesh: device mesh (`partitioning.create_mesh`).
    rules: logical axis rules (`partitioning.logical_axis_rules()`).
    num_microbatches: M, gradient accumulation inside one step (divides the batch).
    loss_normalization: 'microbatch_mean' (official) or 'tokens' (see module docstring).
    z_loss: t5x z-loss coefficient (0, as PHATGOOSE).
    base_dtype: cast the frozen base params to this dtype (e.g. 'bfloat16'); None keeps them.
    site_input_keys: batch keys forwarded to every site as ``site_inputs`` (e.g. 'task_ids').
    learning_rate_fn: the schedule, only for logging ``lr``.
  """

  def __init__(self, model: nn.Module, trainable_mask: Any, optimizer: optax.GradientTransformation,
               mesh: Mesh, rules: Sequence, *, num_microbatches: int = 1,
               loss_normalization: str = "microbatch_mean", z_loss: float = 0.0,
               base_dtype: Optional[Any] = None, site_input_keys: Sequence[str] = (),
               learning_rate_fn: Optional[Callable[[Any], Any]] = None):
    if num_microbatches < 1:
      raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if loss_normalization not in ("microbatch_mean", "tokens"):
      raise ValueError(f"loss_normalization must be 'microbatch_mean' or 'tokens', "
                       f"got {loss_normalization!r}")
    self.model = model
    self.trainable_mask = trainable_mask
    self.tx = optimizer
    self.mesh = mesh
    self.rules = tuple(rules)
    self.num_microbatches = int(num_microbatches)
    self.loss_normalization = loss_normalization
    self.z_loss = float(z_loss)
    self.base_dtype = base_dtype
    self.site_input_keys = tuple(site_input_keys)
    self.learning_rate_fn = learning_rate_fn
    self.base_params = None
    self.state_shardings = None
    self._replicated = partitioning.replicated(mesh)
    self._batch_sharding = partitioning.batch_sharding(mesh, self.rules, ndim=1)
    self._train_step = None
    self._eval_step = None
    self._steps_key = None

  # ------------------------------------------------------------------------------------------------
  # State.
  # ------------------------------------------------------------------------------------------------
  def _shardings(self, axes: Optional[Mapping[str, Any]], tree: Any) -> Any:
    if axes is None:
      return jax.tree.map(lambda _: self._replicated, tree)
    specs = partitioning.logical_spec_tree(axes)
    return partitioning.shardings_from_axes(specs, tree, self.mesh, self.rules)

  def _opt_shardings(self, trainable: Any, trainable_sh: Any) -> Any:
    """Optimiser-state leaves shaped like a trainable leaf get its sharding; others replicate."""
    flat_sh = state_lib.flatten(trainable_sh)
    flat_shapes = {k: v.shape for k, v in state_lib.flatten(trainable).items()}
    abstract = jax.eval_shape(self.tx.init, trainable)

    def pick(path, leaf):
      keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
      for i in range(len(keys)):
        name = "/".join(keys[i:])
        if name in flat_sh and flat_shapes[name] == leaf.shape:
          return flat_sh[name]
      return self._replicated
    return jax.tree_util.tree_map_with_path(pick, abstract)

  def create_state(self, variables: Mapping[str, Any], seed: int = 0) -> Dict[str, Any]:
    """Places the variables on the mesh and builds the train state.

    Args:
      variables: ``params`` (base), ``adapters`` and optionally ``params_axes`` /
        ``adapters_axes`` (missing axes -> replicated).
      seed: seed of the dropout key.
    Returns:
      ``{'step': int32[], 'rng': uint32[2], 'trainable': {...}, 'frozen': {...}, 'opt_state': ...}``;
      the base params are kept in ``self.base_params`` (not part of the state: never saved).
    """
    for name in ("params", "adapters"):
      if name not in variables:
        raise ValueError(f"variables has no {name!r} collection (got {sorted(variables)})")
    params = unfreeze(variables["params"])
    if self.base_dtype is not None:
      dtype = jnp.dtype(self.base_dtype)
      params = jax.tree.map(lambda x: np.asarray(x).astype(dtype) if
                            jnp.issubdtype(np.asarray(x).dtype, jnp.floating) else x, params)
    params_sh = self._shardings(variables.get("params_axes"), params)
    self.base_params = jax.device_put(params, params_sh)
    adapters = unfreeze(variables["adapters"])
    adapters_sh = self._shardings(variables.get("adapters_axes"), adapters)
    trainable, frozen = state_lib.split_trainable(adapters, self.trainable_mask)
    trainable_sh, frozen_sh = state_lib.split_trainable(adapters_sh, self.trainable_mask)
    trainable = jax.device_put(trainable, trainable_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    opt_sh = self._opt_shardings(trainable, trainable_sh)
    opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(trainable)
    rng = jax.random.key_data(jax.random.key(seed))
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), self._replicated),
        "rng": jax.device_put(rng, self._replicated),
        "trainable": trainable,
        "frozen": frozen,
        "opt_state": opt_state,
    }
    shardings = jax.tree.map(lambda x: x.sharding, state)
    key = (jax.tree.structure(shardings), tuple(jax.tree.leaves(shardings)),
           tuple(jax.tree.leaves(params_sh)))
    if self._train_step is None or key != self._steps_key:  # Reuse compiled steps when possible.
      self.state_shardings = shardings
      self._steps_key = key
      self._build_steps(params_sh)
    return state

  def adapters(self, state: Mapping[str, Any]) -> dict:
    """The full adapters collection (trainable merged with frozen) of a state."""
    return state_lib.merge(state["trainable"], state["frozen"])

  # ------------------------------------------------------------------------------------------------
  # Steps.
  # ------------------------------------------------------------------------------------------------
  def _forward(self, trainable, frozen, params, batch, rng, enable_dropout: bool):
    adapters = state_lib.merge(trainable, frozen)
    site_inputs = {k: batch[k] for k in self.site_input_keys}
    rngs = {"dropout": rng} if enable_dropout else {}
    logits = self.model.apply({"params": params, "adapters": adapters},
                              batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                              batch["decoder_target_tokens"], enable_dropout=enable_dropout,
                              site_inputs=site_inputs or None, rngs=rngs)  # [B, T, V]
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = targets > 0
    loss, ntok = cross_entropy_loss(logits, targets, weights, self.z_loss)
    correct = ((jnp.argmax(logits, -1) == targets) * weights.astype(jnp.float32)).sum()
    return loss, (ntok, correct)

  def _build_steps(self, params_sh) -> None:
    m = self.num_microbatches
    grad_fn = jax.value_and_grad(self._forward, has_aux=True)

    def train_step(state, params, batch):
      step = state["step"]
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
      trainable, frozen = state["trainable"], state["frozen"]
      if m == 1:
        (loss, (ntok, correct)), grads = grad_fn(trainable, frozen, params, batch, key, True)
      else:
        def split(x):  # [B, ...] -> [M, B/M, ...], microbatch i = rows i::M
          if x.shape[0] % m:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by num_microbatches={m}")
          return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)
        micro = jax.tree.map(split, dict(batch))

        def body(carry, xs):
          mb, i = xs
          (l, (n, c)), g = grad_fn(trainable, frozen, params, mb, jax.random.fold_in(key, i), True)
          w = n if self.loss_normalization == "tokens" else jnp.float32(1.0)
          g_acc, l_acc, w_acc, n_acc, c_acc = carry
          g_acc = jax.tree.map(lambda a, b: a + b * w, g_acc, g)
          return (g_acc, l_acc + l * w, w_acc + w, n_acc + n, c_acc + c), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0), jnp.float32(0))
        (g_sum, l_sum, w_sum, ntok, correct), _ = jax.lax.scan(
            body, init, (micro, jnp.arange(m)))
        w_sum = jnp.maximum(w_sum, 1.0)
        grads = jax.tree.map(lambda g: g / w_sum, g_sum)
        loss = l_sum / w_sum
      finite = jnp.isfinite(loss) & _tree_all_finite(grads)
      updates, new_opt = self.tx.update(grads, state["opt_state"], trainable)
      new_trainable = optax.apply_updates(trainable, updates)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = dict(state, step=jnp.where(finite, step + 1, step),
                       trainable=keep(new_trainable, trainable),
                       opt_state=keep(new_opt, state["opt_state"]))
      metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": ntok,
                 "accuracy": correct / jnp.maximum(ntok, 1.0), "finite": finite}
      if self.learning_rate_fn is not None:
        metrics["lr"] = jnp.asarray(self.learning_rate_fn(step), jnp.float32)
      return new_state, metrics

    def eval_step(state, params, batch):
      loss, (ntok, correct) = self._forward(state["trainable"], state["frozen"], params, batch,
                                            None, False)
      return {"loss_sum": loss * ntok, "tokens": ntok, "correct": correct}

    donate = (0,) if jax.default_backend() != "cpu" else ()
    self._train_step = jax.jit(
        train_step, in_shardings=(self.state_shardings, params_sh, self._batch_sharding),
        out_shardings=(self.state_shardings, self._replicated), donate_argnums=donate)
    self._eval_step = jax.jit(
        eval_step, in_shardings=(self.state_shardings, params_sh, self._batch_sharding),
        out_shardings=self._replicated)

  def _partitioning(self):
    """`partitioning.partitioning_scope` of this trainer's mesh and rules."""
    return partitioning.partitioning_scope(self.mesh, self.rules)

  def _device_batch(self, batch: Batch) -> dict:
    keys = BATCH_KEYS + ("decoder_loss_weights",) + self.site_input_keys
    missing = [k for k in BATCH_KEYS + self.site_input_keys if k not in batch]
    if missing:
      raise ValueError(f"batch is missing feature(s) {missing} (has {sorted(batch)})")
    local = {k: np.asarray(batch[k]) for k in keys if k in batch}
    return partitioning.global_batch(local, self.mesh, self.rules)

  def train_step(self, state: Dict[str, Any], batch: Batch) -> tuple:
    """One optimiser update on a host-local numpy batch. Returns (state, metrics on device)."""
    if self._train_step is None:
      raise RuntimeError("call create_state() before train_step()")
    with self._partitioning():  # the model's logical activation constraints take effect
      return self._train_step(state, self.base_params, self._device_batch(batch))

  def evaluate(self, state: Dict[str, Any], batches: Iterable[Batch],
               batch_size: Optional[int] = None) -> Dict[str, float]:
    """Token-level loss and accuracy over ``batches`` (dropout off).

    Args:
      state: the train state.
      batches: host-local numpy batches; a final partial batch is fine.
      batch_size: pad every batch to this many rows (zero tokens, zero loss weight: they count
        for nothing), so a partial last batch keeps the compiled shape (default: no padding).
        Either way a batch is also padded up to a multiple of the host's data-parallel shards
        (`partitioning.local_batch_shards`), so any batch size works on any mesh.

    On several hosts every host runs the same number of steps (the jitted step is one global
    computation): hosts with fewer batches step through all-zero batches, as t5x pads its eval
    sets. Raises ValueError when no target token was scored (e.g. a validation split smaller
    than a batch with remainder dropping, or an empty split): a 0 loss would win every
    best-step comparison.
    """
    shards = partitioning.local_batch_shards(self.mesh, self.rules)
    local = (self._pad_rows(dict(b), batch_size, shards) for b in batches)  # streamed on one host
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      local = list(local)
      count = len(local)
      counts = multihost_utils.process_allgather(np.asarray(count, np.int32))
      if int(np.min(counts)) == 0 < int(np.max(counts)):  # every host sees it, none hangs
        raise ValueError(f"validation: some hosts have no batch (batches per host: "
                         f"{np.asarray(counts).tolist()}); use a validation split with at "
                         "least one batch per host")
      if int(np.max(counts)) > count:
        local += [{k: np.zeros_like(v) for k, v in local[0].items()}] * (int(np.max(counts))
                                                                          - count)
    totals = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
    steps = 0
    for batch in local:
      steps += 1
      with self._partitioning():
        out = jax.device_get(self._eval_step(state, self.base_params,
                                             self._device_batch(batch)))
      for k in totals:
        totals[k] += float(out[k])
    if totals["tokens"] <= 0:
      raise ValueError(f"validation scored no target tokens ({steps} batch(es) on this host): "
                       "the split is empty or smaller than one batch")
    n = totals["tokens"]
    return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n,
            "tokens": totals["tokens"]}

  @staticmethod
  def _pad_rows(batch: Dict[str, Any], rows: Optional[int], multiple: int = 1
                ) -> Dict[str, Any]:
    """Pads every array of ``batch`` with zero rows to ``rows`` rows (None: its own count),
    rounded up to a multiple of ``multiple``; no-op when already that size."""
    have = int(np.shape(next(iter(batch.values())))[0])
    if rows is not None and have > rows:
      raise ValueError(f"validation batch has {have} rows, more than batch_size={rows}")
    rows = have if rows is None else rows
    rows = -(-rows // multiple) * multiple
    if have == rows:
      return batch
    return {k: np.concatenate([np.asarray(v), np.zeros((rows - have,) + np.shape(v)[1:],
                                                        np.asarray(v).dtype)]) for k, v in
            batch.items()}

  # ------------------------------------------------------------------------------------------------
  # The loop.
  # ------------------------------------------------------------------------------------------------
  def fit(self, state: Dict[str, Any], train_iter: Iterator[Batch], steps: int, *,
          model_dir: str, eval_iter_fn: Optional[Callable[[], Iterable[Batch]]] = None,
          eval_batch_size: Optional[int] = None,
          eval_every: Optional[int] = None, checkpoint_every: Optional[int] = None,
          log_every: int = 10, best_metric: str = "loss", best_mode: str = "min",
          best_ties: str = "first", validate_at_start: bool = True,
          eval_fn: Optional[Callable[[Dict[str, Any]], Dict[str, float]]] = None,
          base_fingerprint: Optional[str] = None,
          export_metadata: Optional[Mapping[str, Any]] = None, export: bool = True,
          max_to_keep: Optional[int] = 3, async_checkpoints: bool = True,
          handle_signals: bool = True, progress: bool = True,
          skip_batch_fn: Optional[Callable[[Iterator[Batch], Any], None]] = None,
          run_identity: Optional[Mapping[str, Any]] = None) -> FitResult:
    """Trains to ``steps`` (resuming from the latest checkpoint in ``model_dir`` if any).

    Args:
      state: a fresh state from `create_state` (replaced by the checkpoint when resuming).
      train_iter: host-local numpy batches in t5x layout. Its position is saved as the number of
        batches consumed plus ``train_iter.state()`` (`phatgoose_jax.data.pipeline.DataIterator`)
        or ``get_state()`` if it has one; on resume ``restore(...)`` / ``set_state(...)`` is called
        if available, else ``skip_batch_fn(iter, meta)``
        if given, else that many batches are skipped.
      steps: total optimiser steps of the run (TRAIN_STEPS).
      model_dir: MODEL_DIR (checkpoints, logs, export).
      eval_iter_fn: returns a fresh iterable of validation batches; loss/accuracy via `evaluate`.
      eval_batch_size: rows every validation batch is padded to (`evaluate`'s ``batch_size``).
      eval_every: validate every this many steps (plus the last step, and step 0 when
        ``validate_at_start``).
      checkpoint_every: save every this many steps (plus the last step).
      log_every: train-metrics logging period.
      best_metric / best_mode: which validation metric selects the best step ('min' or 'max').
      validate_at_start: also validate (and possibly select) step 0, before any update (the
        official expert recipe evaluates first; its gate recipe does not).
      best_ties: 'first' keeps the earlier best on an equal metric; 'last' moves to the later
        step (the official PHATGOOSE Evaluator's ``>=``, see `training.task_validation`).
      eval_fn: custom validation (e.g. seqio rank classification): state -> metrics; used
        instead of ``eval_iter_fn`` when given.
      base_fingerprint: fingerprint of the frozen base model, stored in checkpoints and exports;
        resuming with a different one raises `state.ResumeError`.
      export_metadata: extra JSON fields of ``export/metadata.json`` (task, rank, scale, mode).
      export: write ``export/`` (best adapters, or the final ones without validation).
      handle_signals: on SIGTERM/SIGINT, finish the current step, save and return.
      run_identity: JSON settings a resume must keep (`state.check_resume_meta`); the best-step
        metric and mode are always part of it. Checked before the state is restored.
    """
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if best_ties not in ("first", "last"):
      raise ValueError(f"best_ties must be 'first' or 'last', got {best_ties!r}")
    validate = eval_fn or ((lambda s: self.evaluate(s, eval_iter_fn(), eval_batch_size))
                           if eval_iter_fn else None)
    ckpt = state_lib.Checkpointer(model_dir, max_to_keep=max_to_keep, async_save=async_checkpoints)
    best: Optional[Dict[str, Any]] = None
    consumed = 0
    latest = ckpt.latest_step()
    identity = {**dict(run_identity or {}), "best_metric": best_metric, "best_mode": best_mode}
    if latest is not None:
      try:
        state_lib.check_resume_meta(ckpt.restore_meta(latest), base_fingerprint, model_dir,
                                    identity)
        state, meta = ckpt.restore(latest, state_lib.abstract_like(state))
      except BaseException:
        ckpt.close()
        raise
      best = meta.get("best")
      position = meta.get("data_position", {})
      consumed = int(position.get("batches", 0))
      restore_fn = _iter_method(train_iter, ("restore", "set_state"))
      if restore_fn is not None and position.get("iterator_state") is not None:
        restore_fn(position["iterator_state"])
      elif skip_batch_fn is not None:
        skip_batch_fn(train_iter, position)
      else:
        for _ in range(consumed):
          next(train_iter)
    step = int(jax.device_get(state["step"]))
    logger = MetricsLogger(model_dir, steps, step, progress=progress, truncate=True)
    if latest is not None:
      logger.message(f"resumed from {ckpt.directory}/{latest} (step {step})")
    stop = {"signal": None}
    old_handlers = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
      def on_signal(signum, frame):  # pylint: disable=unused-argument
        stop["signal"] = signum
      for sig in (signal.SIGTERM, signal.SIGINT):
        old_handlers[sig] = signal.signal(sig, on_signal)

    def meta_now():
      position = {"batches": consumed}
      get_fn = _iter_method(train_iter, ("state", "get_state"))
      if get_fn is not None:
        position["iterator_state"] = get_fn()
      return {"step": step, "data_position": position, "best": best,
              "base_fingerprint": base_fingerprint, "run": identity}

    def do_export(kind: str, metric_value=None):
      if not export:
        return
      adapters = self.adapters(state)
      if any(isinstance(x, jax.Array) and not x.is_fully_addressable
             for x in jax.tree.leaves(adapters)):
        # A leaf sharded across hosts (e.g. parameter_partitioning_dims=2): every host joins
        # the gather (the same decision on all of them: shardings are global), host 0 writes.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        adapters = multihost_utils.process_allgather(adapters, tiled=True)
      if jax.process_index() != 0:
        return
      meta = dict(export_metadata or {})
      meta.update(step=step, selected_by=kind, base_fingerprint=base_fingerprint,
                  metric=best_metric if kind == "best" else None, metric_value=metric_value,
                  complete=kind == "final")  # a 'best' export is interim until the run ends
      state_lib.export_adapters(model_dir, adapters, meta)

    def run_validation():
      nonlocal best
      metrics = validate(state)
      logger.write(step, "eval", metrics)
      if best_metric not in metrics:
        raise ValueError(f"best_metric {best_metric!r} not among validation metrics "
                         f"{sorted(metrics)}")
      value = float(metrics[best_metric])
      if best is None or (best_ties == "last" and value == best["value"]):
        better = True
      else:
        better = value < best["value"] if best_mode == "min" else value > best["value"]
      if better:
        best = {"step": step, "metric": best_metric, "value": value}
        do_export("best", value)
      logger.message(f"step {step}: eval {best_metric}={value:.5g} (best {best['value']:.5g} "
                     f"at step {best['step']})")

    last_saved = latest
    last_metrics = None
    try:
      if validate is not None and validate_at_start and step == 0 and best is None:
        run_validation()
      window_tokens, window_start = 0.0, time.time()
      while step < steps and stop["signal"] is None:
        try:
          batch = next(train_iter)
        except StopIteration:
          raise ValueError(f"the training data ran out after {consumed} batches "
                           f"(step {step} of {steps})") from None
        state, metrics = self.train_step(state, batch)
        host = jax.device_get(metrics)
        if not bool(host["finite"]):
          raise NonFiniteError(
              f"non-finite loss or gradients at step {step + 1} (loss={float(host['loss'])}); "
              f"update not applied; last good checkpoint: "
              f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in "
              f"{ckpt.directory}")
        step += 1
        consumed += 1
        last_metrics = {k: float(v) for k, v in host.items() if k != "finite"}
        window_tokens += last_metrics["tokens"]
        elapsed = max(time.time() - window_start, 1e-9)
        logger.progress(1, {"loss": last_metrics["loss"], "tok/s": window_tokens / elapsed})
        if step % max(log_every, 1) == 0 or step == steps:
          logger.write(step, "train", dict(last_metrics, tokens_per_s=window_tokens / elapsed))
          window_tokens, window_start = 0.0, time.time()
        if validate is not None and ((eval_every and step % eval_every == 0) or step == steps):
          run_validation()
        if (checkpoint_every and step % checkpoint_every == 0) or step == steps:
          ckpt.save(step, state, meta_now(), force=True)
          last_saved = step
      if stop["signal"] is not None and last_saved != step:
        ckpt.save(step, state, meta_now(), force=True)
        logger.message(f"signal {stop['signal']}: saved step {step} in {ckpt.directory}")
      elif step >= steps and validate is None:
        do_export("final")
      elif step >= steps and export and jax.process_index() == 0:
        state_lib.mark_export_complete(model_dir)  # the run finished: its best step is final
      ckpt.wait()
    finally:
      ckpt.close()
      logger.close()
      for sig, handler in old_handlers.items():
        signal.signal(sig, handler)
    return FitResult(state=state, step=step, best=best, interrupted=stop["signal"],
                     last_train_metrics=last_metrics)
