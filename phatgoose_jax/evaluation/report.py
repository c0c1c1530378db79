"""Result tables (markdown + JSON), routing statistics and the routing heatmap.

Routing traces come from routed sites built with ``AdapterConfig(trace=True)``: each site sows
``routing`` = (indices [B, L, K], weights [B, L, K]) into the ``intermediates`` collection
(`collect_routing_trace` runs a teacher-forced pass and gathers them as ``{site: (indices,
weights)}``). Statistics per site: the histogram of the top-1 expert over real tokens, its entropy,
the routing-weight mass per expert and the mean per-token entropy of the weights.
`plot_routing_heatmap` draws the top-1 expert of every token (x) at every site (y) of one example, as
the routing analysis figure of PHATGOOSE (Muqeeth et al., ICML 2024, sec. 5.3).

All files are written atomically (temporary file in the same directory, then ``os.replace``).

Letters: B batch, L tokens at a site, K experts kept per token, E experts.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np

from phatgoose_jax import fileperm

Trace = Mapping[str, tuple]


class ReportError(ValueError):
  """Bad rows, traces or paths given to the report writers."""


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and ``os.replace``."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    fileperm.ordinary_mode(tmp)  # mkstemp creates 0600; give the file ordinary permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _finite(x: Any) -> Any:
  """NaN/inf -> None so the JSON stays standard (numpy scalars and arrays included)."""
  if isinstance(x, np.generic):
    x = x.item()
  elif isinstance(x, np.ndarray):
    x = x.tolist()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_bytes(path, json.dumps(_finite(obj), indent=2, sort_keys=True,
                                      default=_json_default, allow_nan=False).encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def results_table(rows: Sequence[Mapping[str, Any]], score_key: str = "score"
                  ) -> tuple[list[str], list[str], dict[str, dict[str, float]]]:
  """(methods, tasks, {method: {task: score, 'average': mean}}) from result rows.

  Each row is ``{'method': str, 'task': str, score_key: float, ...}``; the average of a method is
  the unweighted mean over its tasks (PHATGOOSE's reported number).
  """
  methods, tasks, table = [], [], {}
  for i, row in enumerate(rows):
    for k in ("method", "task", score_key):
      if k not in row:
        raise ReportError(f"results row {i} has no field {k!r} (has {sorted(row)})")
    m, t = str(row["method"]), str(row["task"])
    if t == "average":
      raise ReportError(f"results row {i}: task name 'average' is reserved")
    if m not in table:
      methods.append(m)
      table[m] = {}
    if t not in tasks:
      tasks.append(t)
    if t in table[m]:
      raise ReportError(f"results row {i}: duplicate (method={m!r}, task={t!r})")
    table[m][t] = float(row[score_key])
  for m in methods:
    table[m]["average"] = float(np.mean(list(table[m].values())))
  return methods, tasks, table


def markdown_table(methods: Sequence[str], tasks: Sequence[str],
                   table: Mapping[str, Mapping[str, float]], digits: int = 1) -> str:
  """Method x task markdown table with an average column ('-' for missing cells)."""
  cols = list(tasks) + ["average"]
  lines = ["| method | " + " | ".join(cols) + " |",
           "| --- | " + " | ".join("---:" for _ in cols) + " |"]
  for m in methods:
    cells = [f"{table[m][c]:.{digits}f}" if c in table[m] else "-" for c in cols]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# routing traces and statistics
# ------------------------------------------------------------------------------------------------
def flatten_routing_trace(intermediates: Mapping[str, Any]) -> dict[str, tuple]:
  """``intermediates`` collection -> ``{site: (indices [B, L, K], weights [B, L, K])}`` (numpy).

  A site sown several times (repeated calls) has its calls concatenated along the token axis.
  """
  out: dict[str, tuple] = {}

  def visit(node: Mapping[str, Any], path: tuple) -> None:
    for key, value in node.items():
      if key == "routing":
        calls = list(value) if isinstance(value, (tuple, list)) else [value]
        if calls and not isinstance(calls[0], (tuple, list)):
          calls = [tuple(calls)]
        idx = np.concatenate([np.asarray(c[0]) for c in calls], axis=-2)
        w = np.concatenate([np.asarray(c[1]) for c in calls], axis=-2)
        out["/".join(path)] = (idx, w)
      elif isinstance(value, Mapping):
        visit(value, path + (str(key),))
  visit(intermediates, ())
  return out


def collect_routing_trace(model: nn.Module, variables: Mapping[str, Any],
                          batch: Mapping[str, Any],
                          site_inputs: Optional[Mapping[str, Any]] = None) -> dict[str, tuple]:
  """Runs one teacher-forced pass of a tracing model and returns ``{site: (indices, weights)}``.

  Args:
    model: a `Transformer` built with ``AdapterConfig(mode='routed', trace=True)``.
    variables: its variables.
    batch: ``encoder_input_tokens`` [B, L], ``decoder_target_tokens`` [B, T] and optionally
      ``decoder_input_tokens`` (default: targets shifted right).
    site_inputs: per-example extras.

  Raises:
    ReportError: no site sowed a routing trace (the model was not built with ``trace=True``).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  targets = np.asarray(batch["decoder_target_tokens"])
  dec_in = batch.get("decoder_input_tokens")
  dec_in = scoring.shift_right(targets) if dec_in is None else np.asarray(dec_in)
  _, state = model.apply(scoring.model_variables(variables),
                         jnp.asarray(batch["encoder_input_tokens"]), jnp.asarray(dec_in),
                         jnp.asarray(targets), enable_dropout=False,
                         site_inputs=dict(site_inputs) if site_inputs else None,
                         mutable=["intermediates"])
  trace = flatten_routing_trace(state.get("intermediates", {}))
  if not trace:
    raise ReportError("collect_routing_trace: no site sowed 'routing'; build the model with "
                      "AdapterConfig(mode='routed', trace=True)")
  return trace


def _site_side(site: str) -> str:
  from phatgoose_jax.adapters import site_token_side  # pylint: disable=g-import-not-at-top
  return site_token_side(site)


def top1_experts(indices: Any, weights: Any) -> np.ndarray:
  """The highest-weight expert of every token: [..., K] -> [...]."""
  indices, weights = np.asarray(indices), np.asarray(weights)
  best = np.argmax(weights, axis=-1)[..., None]
  return np.take_along_axis(indices, best, axis=-1)[..., 0]


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
  p = np.asarray(p, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, -p * np.log(p), 0.0)
  return terms.sum(axis=axis)


def routing_statistics(trace: Trace, num_experts: int,
                       encoder_mask: Optional[Any] = None,
                       decoder_mask: Optional[Any] = None) -> dict[str, dict[str, Any]]:
  """Per-site routing statistics over the real tokens of a trace.

  Args:
    trace: ``{site: (indices [B, L, K], weights [B, L, K])}``.
    num_experts: E.
    encoder_mask: [B, L_enc] 1 for real encoder tokens (sites reading encoder tokens).
    decoder_mask: [B, T] 1 for real decoder tokens (other decoder sites).

  Returns:
    {site: {'num_tokens', 'top1_counts' [E], 'top1_fraction' [E], 'top1_entropy' (nats, of the
    top-1 histogram), 'weight_mass' [E] (mean routing weight per token), 'token_entropy' (mean
    per-token entropy of the weights, nats)}}.
  """
  if num_experts < 1:
    raise ReportError(f"routing_statistics: num_experts must be >= 1, got {num_experts}")
  stats = {}
  for site, (indices, weights) in trace.items():
    indices, weights = np.asarray(indices), np.asarray(weights, np.float64)
    if indices.shape != weights.shape:
      raise ReportError(f"routing trace of {site!r}: indices {indices.shape} vs weights "
                        f"{weights.shape}")
    mask = encoder_mask if _site_side(site) == "encoder" else decoder_mask
    if mask is None:
      keep = np.ones(indices.shape[:-1], bool)
    else:
      keep = np.asarray(mask).astype(bool)
      if keep.shape != indices.shape[:-1]:
        raise ReportError(f"routing trace of {site!r}: token shape {indices.shape[:-1]} does not "
                          f"match its mask {keep.shape}")
    if indices.size and indices.max() >= num_experts:
      raise ReportError(f"routing trace of {site!r}: expert index {indices.max()} >= "
                        f"num_experts={num_experts}")
    top1 = top1_experts(indices, weights)[keep]  # [tokens]
    counts = np.bincount(top1.astype(np.int64), minlength=num_experts)
    n = int(keep.sum())
    frac = counts / max(n, 1)
    mass = np.zeros(num_experts)
    np.add.at(mass, indices[keep].reshape(-1), weights[keep].reshape(-1))
    w = weights[keep]  # [tokens, K]
    total = w.sum(-1, keepdims=True)
    token_entropy = _entropy(w / np.where(total > 0, total, 1.0)) if n else np.zeros(0)
    stats[site] = {"num_tokens": n, "top1_counts": counts.tolist(),
                   "top1_fraction": frac.tolist(), "top1_entropy": float(_entropy(frac)),
                   "weight_mass": (mass / max(n, 1)).tolist(),
                   "token_entropy": float(token_entropy.mean()) if n else 0.0}
  return stats


def routing_markdown(stats: Mapping[str, Mapping[str, Any]],
                     expert_names: Optional[Sequence[str]] = None) -> str:
  """A markdown table: site, tokens, top-1 histogram (%), entropies."""
  lines = ["| site | tokens | top-1 share (%) | top-1 entropy | token entropy |",
           "| --- | ---: | --- | ---: | ---: |"]
  for site, s in stats.items():
    names = expert_names or [str(e) for e in range(len(s["top1_fraction"]))]
    hist = ", ".join(f"{names[e]}: {100 * f:.0f}" for e, f in enumerate(s["top1_fraction"]) if f)
    lines.append(f"| {site} | {s['num_tokens']} | {hist} | {s['top1_entropy']:.3f} | "
                 f"{s['token_entropy']:.3f} |")
  return "\n".join(lines) + "\n"


def plot_routing_heatmap(trace: Trace, tokens: Sequence[str], path: str, *, example: int = 0,
                         side: str = "encoder", num_experts: Optional[int] = None,
                         expert_names: Optional[Sequence[str]] = None,
                         sites: Optional[Sequence[str]] = None, title: str = "") -> str:
  """Saves a PNG of the top-1 expert per token (x) per site (y) for one example.

  Args:
    trace: ``{site: (indices [B, L, K], weights [B, L, K])}``.
    tokens: the example's token strings on ``side`` (x labels; their count sets the x extent).
    path: output ``.png``.
    example: which batch row.
    side: 'encoder' (sites reading encoder tokens) or 'decoder'.
    num_experts: E (colour scale); default 1 + the largest index seen.
    expert_names: legend labels.
    sites: subset/order of sites (default: every site of ``side`` in trace order).
    title: figure title.

  Returns:
    ``path``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.colors import ListedColormap  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  if side not in ("encoder", "decoder"):
    raise ReportError(f"plot_routing_heatmap: side must be 'encoder' or 'decoder', got {side!r}")
  if not tokens:
    raise ReportError("plot_routing_heatmap: tokens is empty")
  chosen = list(sites) if sites is not None else [s for s in trace if _site_side(s) == side]
  missing = [s for s in chosen if s not in trace]
  if missing or not chosen:
    raise ReportError(f"plot_routing_heatmap: no trace for site(s) {missing or chosen} on side "
                      f"{side!r} (trace has {len(trace)} sites)")
  n = len(tokens)
  grid = np.zeros((len(chosen), n), np.int64)
  for r, site in enumerate(chosen):
    indices, weights = trace[site]
    if not 0 <= example < np.asarray(indices).shape[0]:
      raise ReportError(f"plot_routing_heatmap: example {example} out of range for {site!r}")
    top = top1_experts(indices, weights)[example]  # [L]
    if top.shape[0] < n:
      raise ReportError(f"plot_routing_heatmap: site {site!r} has {top.shape[0]} tokens < "
                        f"{n} token labels")
    grid[r] = top[:n]
  e = int(num_experts or grid.max() + 1)
  base = plt.get_cmap("tab20" if e > 10 else "tab10")
  cmap = ListedColormap([base(i % base.N) for i in range(e)])
  fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n + 2.5), max(3.0, 0.22 * len(chosen) + 1.5)))
  ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=e - 0.5, aspect="auto", interpolation="nearest")
  ax.set_xticks(range(n))
  ax.set_xticklabels([str(t) for t in tokens], rotation=90, fontsize=7)
  ax.set_yticks(range(len(chosen)))
  ax.set_yticklabels(chosen, fontsize=6)
  ax.set_xlabel(f"{side} token")
  ax.set_ylabel("site")
  names = expert_names or [f"expert {i}" for i in range(e)]
  used = sorted(set(grid.reshape(-1).tolist()))
  ax.legend(handles=[Patch(color=cmap(i), label=names[i]) for i in used],
            bbox_to_anchor=(1.01, 1.0), loc="upper left", fontsize=7, title="top-1 expert")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())
  return os.fspath(path)


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def write_report(run_dir: str, rows: Sequence[Mapping[str, Any]], *,
                 routing_stats: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 expert_names: Optional[Sequence[str]] = None, title: str = "Results",
                 score_key: str = "score", extra: Optional[Mapping[str, Any]] = None
                 ) -> dict[str, str]:
  """Writes ``results.json`` and ``report.md`` into ``run_dir``.

  Args:
    run_dir: output directory (created).
    rows: ``[{'method', 'task', score_key, ...}]``; extra fields are kept in the JSON.
    routing_stats: optional output of `routing_statistics`.
    expert_names: names of the experts (routing table labels).
    title: markdown heading.
    score_key: the score field of the rows.
    extra: more JSON-serialisable metadata (config, run info).

  Returns:
    {'results': path, 'report': path}.
  """
  methods, tasks, table = results_table(rows, score_key)
  results = {"rows": [dict(r) for r in rows], "table": table, "methods": methods, "tasks": tasks}
  if routing_stats is not None:
    results["routing"] = {k: dict(v) for k, v in routing_stats.items()}
  if expert_names is not None:
    results["expert_names"] = list(expert_names)
  if extra:
    results["extra"] = dict(extra)
  md = [f"# {title}\n", markdown_table(methods, tasks, table)]
  if routing_stats:
    md += ["\n## Routing statistics\n", routing_markdown(routing_stats, expert_names)]
  paths = {"results": os.path.join(run_dir, "results.json"),
           "report": os.path.join(run_dir, "report.md")}
  atomic_write_json(paths["results"], results)
  atomic_write_bytes(paths["report"], "\n".join(md).encode("utf-8"))
  return paths
