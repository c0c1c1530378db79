"""Importing experts from official PyTorch PHATGOOSE checkpoints (r-three/phatgoose ``best.pt``).

The official code attaches "addons" to every linear module of a HF ``T5ForConditionalGeneration``
and saves a flat torch state dict (``torch.save(OrderedDict)``) whose adapter keys are::

    <module>._addons.expert_lora.layer1__<i>          [d_in, R]   (LoRA A, already [in, out] layout)
    <module>._addons.expert_lora.layer2__<i>          [R, d_out]  (LoRA B)
    <module>._addons.router.expert_embeddings__<i>    [d_in]      (router vector of expert i)
    <module>._addons.expert_lora.expert_input_gate    [d_in]      (gate being trained, one expert)

with ``<module>`` a HF T5 name (``encoder.block.0.layer.0.SelfAttention.q``). Experts are raw
``nn.Parameter`` s named ``<param>_<identifier>``, identifier ``<stem>_<n>``; the official
scripts use an empty stem, hence ``layer1__0``, ``layer1__1``, ...; ``scripts/concatenate.py``
renumbers each single-expert ``best.pt`` into one library checkpoint. ``FFNExperts._forward``
computes ``(x @ layer1) @ layer2`` and, with ``divide_by_d_bottleneck=True`` (all the paper's gin
configs), divides by R: so lora_a = layer1, lora_b = layer2 and scale = 1/R, no transposition.

PHATGOOSE gates: stage 2 trains ``expert_lora.expert_input_gate`` (``learn_input_gate=
'only_sigmoid'``: the site input is multiplied by sigmoid(x · gate), equivalent to scaling Δ(x)
since LoRA is linear); ``use_input_gate_as_router`` (scripts/manipulations.py) then copies it to
``router.expert_embeddings__0``. We read ``router.expert_embeddings__<i>`` and fall back to
``expert_input_gate`` for a single-expert checkpoint that was not converted yet. For
Average-Activation checkpoints the same key holds averaged hidden states (store them with another
kind via `ExpertLibrary.set_vectors`).

Not covered: ``FFNExperts(use_input_gate=True)`` (no paper config uses it) multiplies the
bottleneck by the sigmoid of its own first unit and divides by R - 1, so such an expert is not a
LoRA update and imports wrongly; the state dict does not record the option. Whole-stack routers
(the A1 decoder router, retrieval checkpoints: ``<stack>._addons.router.expert_embeddings__<i>``)
are skipped and listed in ``info['stack_routers']``; their LoRA weights import as usual.

torch is an optional dependency (``pip install phatgoose_jax[torch]``), imported lazily; files are
read with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

Letters: D site input width, F site output width, R LoRA rank.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from phatgoose_jax.library.format import LibraryError
from phatgoose_jax.library.peft_import import _site_order, hf_module_to_site

_KEY_RE = re.compile(
    r"^(?:.*?\.)??((?:encoder|decoder)\.block\.\d+\.layer\.\d+\.\w+\.\w+)\._addons\."
    r"(expert_lora|router)\.(layer1|layer2|expert_embeddings|expert_input_gate)(?:_(\w+))?$")
_INDEX_RE = re.compile(r"^_(\d+)$")
# One router for a whole stack (the official A1 decoder router, ``make_one_router_decoder``, and
# retrieval checkpoints, ``make_checkpoint_for_retrieval``): not a per-site PHATGOOSE gate.
_STACK_ROUTER_RE = re.compile(
    r"^(?:.*?\.)??(encoder|decoder)\._addons\.router\.expert_embeddings_(\w+)$")

ExpertId = Union[int, str]


def _require_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("importing official PHATGOOSE checkpoints needs PyTorch: "
                      "pip install phatgoose_jax[torch]") from e
  return torch


def _to_numpy(tensor: Any, torch: Any) -> np.ndarray:
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return tensor.numpy().copy()


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Loads a ``best.pt`` state dict (tensors only) as numpy arrays."""
  torch = _require_torch()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise LibraryError(f"official PHATGOOSE checkpoint {path} does not exist")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise LibraryError(f"{path}: not a loadable torch state dict: {e}") from e
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(
      state["state_dict"], Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise LibraryError(f"{path}: expected a state dict (a mapping of tensors), got "
                       f"{type(state).__name__}")
  return {str(k): _to_numpy(v, torch) for k, v in state.items() if hasattr(v, "detach")}


def _identifier_index(identifier: str) -> ExpertId:
  m = _INDEX_RE.match(identifier)
  return int(m.group(1)) if m else identifier


def parse_official_state_dict(state: Mapping[str, np.ndarray], source: str = "state dict"
                              ) -> Tuple[Dict[ExpertId, Dict[str, Dict[str, np.ndarray]]],
                                         Dict[str, np.ndarray]]:
  """Groups the adapter tensors of an official state dict by expert.

  Returns:
    ``(experts, input_gates)``: ``experts[i][site]`` has 'lora_a', 'lora_b' and optionally 'gate'
    (``router.expert_embeddings``); ``input_gates[site]`` holds ``expert_input_gate`` vectors.
    ``i`` is an int for the official empty-stem identifiers (``layer1__3`` -> 3), else the
    identifier string.
  """
  experts: Dict[ExpertId, Dict[str, Dict[str, np.ndarray]]] = {}
  input_gates: Dict[str, np.ndarray] = {}
  for key, value in state.items():
    if "._addons." not in key:
      continue  # base-model weights (e.g. embed_tokens) are not part of an expert.
    if _STACK_ROUTER_RE.match(key):
      continue  # a whole-stack router (see `stack_routers`), not part of any site's expert
    m = _KEY_RE.match(key)
    if m is None:
      raise LibraryError(f"{source}: addon tensor {key!r} is not an expert_lora layer1/layer2 or "
                         "router expert_embeddings parameter")
    module, addon, param, identifier = m.groups()
    site = hf_module_to_site(module)
    if site is None:
      raise LibraryError(f"{source}: tensor {key!r}: module {module!r} is not a T5 linear site")
    if param == "expert_input_gate":
      if addon != "expert_lora" or identifier is not None:
        raise LibraryError(f"{source}: unexpected gate tensor {key!r}")
      input_gates[site] = value
      continue
    if identifier is None:
      raise LibraryError(f"{source}: tensor {key!r} lacks an expert identifier suffix "
                         "('__<i>'); was the checkpoint saved with separate_experts=True?")
    if (addon == "router") != (param == "expert_embeddings"):
      raise LibraryError(f"{source}: unexpected tensor {key!r}")
    leaf = {"layer1": "lora_a", "layer2": "lora_b", "expert_embeddings": "gate"}[param]
    slot = experts.setdefault(_identifier_index(identifier), {}).setdefault(site, {})
    slot[leaf] = value
  return experts, input_gates


def stack_routers(state: Mapping[str, np.ndarray]) -> Dict[str, Dict[ExpertId, np.ndarray]]:
  """Whole-stack router vectors of an official state dict, ``{'encoder'|'decoder': {i: [D]}}``.

  The official A1 layout (``moe_lora_rank16_a1.gin``: one decoder router) and retrieval
  checkpoints store ``<stack>._addons.router.expert_embeddings__<i>``. phatgoose_jax routes per
  site, so these are reported (``info['stack_routers']``) but not imported as gates.
  """
  out: Dict[str, Dict[ExpertId, np.ndarray]] = {}
  for key, value in state.items():
    m = _STACK_ROUTER_RE.match(key)
    if m is not None:
      out.setdefault(m.group(1), {})[_identifier_index(m.group(2))] = value
  return out


def _build(index: ExpertId, sites: Mapping[str, Mapping[str, np.ndarray]],
           input_gates: Mapping[str, np.ndarray], single: bool, source: str,
           scale: Optional[float], stacks: Tuple[str, ...] = ()):
  lora: Dict[str, Dict[str, np.ndarray]] = {}
  gates: Dict[str, np.ndarray] = {}
  rank = None
  for site in sorted(sites, key=_site_order):
    slot = sites[site]
    if "lora_a" not in slot or "lora_b" not in slot:
      if set(slot) == {"gate"}:
        continue  # a router vector at a site without LoRA weights: nothing to route to
      raise LibraryError(f"{source}: expert {index!r} at {site}: needs layer1 and layer2, has "
                         f"{sorted(slot)}")
    a, b = slot["lora_a"], slot["lora_b"]  # [D, R], [R, F]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
      raise LibraryError(f"{source}: expert {index!r} at {site}: layer1 {list(a.shape)} and "
                         f"layer2 {list(b.shape)} are not [D, R] and [R, F]")
    if rank is None:
      rank = a.shape[1]
    elif rank != a.shape[1]:
      raise LibraryError(f"{source}: expert {index!r}: field 'rank': {site} has rank "
                         f"{a.shape[1]}, other sites {rank}")
    lora[site] = {"lora_a": a, "lora_b": b}
    gate = slot.get("gate")
    if gate is None and single:
      gate = input_gates.get(site)
    if gate is not None:
      if gate.shape != (a.shape[0],):
        raise LibraryError(f"{source}: expert {index!r} at {site}: gate shape {list(gate.shape)}"
                           f", expected [{a.shape[0]}]")
      gates[site] = gate
  if not lora:
    raise LibraryError(f"{source}: expert {index!r} has no LoRA weights")
  if gates and set(gates) != set(lora):
    missing = sorted(set(lora) - set(gates))
    if not stacks:
      raise LibraryError(f"{source}: expert {index!r}: router vectors missing at sites {missing}")
    gates = {}  # A1 / retrieval layout: per-site gates only where no stack router is used
  stack_note = ({"stack_routers": list(stacks),
                 "stack_routers_note": "whole-stack routers (official A1 / retrieval layout) are "
                 "not imported: phatgoose_jax routes per site"} if stacks else {})
  info = {"import_kind": "phatgoose_official", "source": os.path.abspath(source)
          if os.path.exists(source) else source, "expert_index": index, "rank": int(rank),
          "scale_rule": "1/R (divide_by_d_bottleneck)" if scale is None else "given",
          "gate_source": ("router.expert_embeddings" if any("gate" in s for s in sites.values())
                          else ("expert_lora.expert_input_gate" if gates else None)),
          **stack_note}
  if not gates:
    info["gate_source"] = None
  return lora, (1.0 / rank if scale is None else float(scale)), (gates or None), info


def import_phatgoose_experts(path: str, scale: Optional[float] = None
                             ) -> Dict[ExpertId, Tuple[Dict[str, Dict[str, np.ndarray]], float,
                                                       Optional[Dict[str, np.ndarray]],
                                                       Dict[str, Any]]]:
  """Every expert of an official checkpoint: ``{i: (lora, scale, gates, info)}`` in index order."""
  state = load_state_dict(path)
  experts, input_gates = parse_official_state_dict(state, os.fspath(path))
  stacks = tuple(sorted(stack_routers(state)))
  if not experts:
    raise LibraryError(f"{path}: no '._addons.expert_lora.layer1__<i>' tensors found; is this a "
                       "PHATGOOSE expert checkpoint?")
  single = len(experts) == 1
  order = sorted(experts, key=lambda i: (isinstance(i, str), i))
  return {i: _build(i, experts[i], input_gates, single, os.fspath(path), scale, stacks)
          for i in order}


def import_phatgoose_checkpoint(path: str, expert_index: Optional[ExpertId] = None,
                                scale: Optional[float] = None):
  """One expert of an official PHATGOOSE ``best.pt``.

  Args:
    path: the torch checkpoint.
    expert_index: which expert (``i`` of ``layer1__i``); None requires exactly one expert.
    scale: override the LoRA scale (default 1/R, the official ``divide_by_d_bottleneck``).

  Returns:
    ``(lora, scale, gates, info)``: ``lora = {site: {'lora_a': [D, R], 'lora_b': [R, F]}}``,
    ``gates = {site: [D]}`` or None, ``info`` provenance for `ExpertLibrary.add`.

  Raises:
    ImportError: torch is not installed.
    LibraryError: malformed checkpoint or unknown ``expert_index`` (the message lists the
      available indices).
  """
  experts = import_phatgoose_experts(path, scale)
  if expert_index is None:
    if len(experts) != 1:
      raise LibraryError(f"{path}: holds {len(experts)} experts {list(experts)}; pass "
                         "expert_index (CLI: --expert-index)")
    return next(iter(experts.values()))
  if expert_index not in experts:
    raise LibraryError(f"{path}: expert_index {expert_index!r} not found; available "
                       f"{list(experts)}")
  return experts[expert_index]
