"""Training logs: TensorBoard scalars, a JSONL metrics file and a tqdm progress bar.

Written only by process 0. Files under ``MODEL_DIR``:
  * ``metrics.jsonl``: one JSON object per line, ``{"step", "split", "time", <metric>: value}``
    (split is ``train`` or ``eval``), appended across restarts;
  * ``tensorboard/{train,eval}/``: tensorboardX event files with the same scalars.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Optional

import jax

METRICS_FILE = "metrics.jsonl"


def _drop_records_after(path: str, step: Optional[int]) -> None:
  """Rewrites the JSONL file without unparsable (torn) lines and, unless ``step`` is None,
  without the records of steps after ``step`` (they are redone)."""
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if not line.endswith("\n"):
        raise ValueError("torn")  # the last line of a killed run
      if step is not None and int(json.loads(line).get("step", 0)) > step:
        continue
    except (ValueError, TypeError, AttributeError):
      pass  # dropped: it cannot be parsed
    else:
      kept.append(line)
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
  """Writes scalars to JSONL and TensorBoard and drives a progress bar.

  Args:
    model_dir: run directory (created if needed).
    total_steps: for the progress bar.
    start_step: the step training resumes from.
    tensorboard: also write tensorboardX event files.
    progress: show a tqdm bar (disabled automatically when not on process 0).
  """

  def __init__(self, model_dir: str, total_steps: int, start_step: int = 0,
               tensorboard: bool = True, progress: bool = True, truncate: bool = False):
    self.enabled = jax.process_index() == 0
    self.model_dir = model_dir
    self._writers = {}
    self._tensorboard = tensorboard and self.enabled
    self._bar = None
    if not self.enabled:
      return
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, METRICS_FILE)
    if os.path.isfile(path):
      # `truncate` (the training loop): drop what a killed run logged past the step it resumes
      # from (all of it after step 0 when no checkpoint was reached); always drop a torn line.
      _drop_records_after(path, start_step if truncate else None)
    self._jsonl = open(path, "a")
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                       mininterval=1.0)

  def _writer(self, split: str):
    if split not in self._writers:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writers[split] = SummaryWriter(os.path.join(self.model_dir, "tensorboard", split))
    return self._writers[split]

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    """Records ``metrics`` (python floats) at ``step`` under ``split``."""
    if not self.enabled:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in
             metrics.items()}
    record = {"step": int(step), "split": split, "time": time.time(), **clean}
    self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
    self._jsonl.flush()
    if self._tensorboard:
      writer = self._writer(split)
      for k, v in metrics.items():
        writer.add_scalar(f"{split}/{k}", float(v), int(step))
      writer.flush()

  def progress(self, steps: int, postfix: Optional[Mapping[str, float]] = None) -> None:
    """Advances the bar by ``steps`` and shows e.g. loss and tokens/s."""
    if self._bar is None:
      return
    self._bar.update(steps)
    if postfix:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    for w in self._writers.values():
      w.close()
    self._jsonl.close()
