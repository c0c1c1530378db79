"""Importing Hugging Face PEFT LoRA adapters of a T5 model into t5x LoRA sites.

PEFT's LoRA convention (``peft.tuners.lora.Linear``), for a linear layer with base weight W
[out, in] and adapter weights A [r, in] (``lora_A.weight``) and B [out, r] (``lora_B.weight``)::

    y = x @ W.T + scaling * (x @ A.T) @ B.T,   scaling = lora_alpha / r
                                               (lora_alpha / sqrt(r) with use_rslora)

Ours (t5x kernel layout [in, out]): Δ(u) = (u @ lora_a) @ lora_b * scale, so the import is
``lora_a = A.T`` [D, R], ``lora_b = B.T`` [R, F], ``scale = scaling``; ΔW_t5x = scale * lora_a @
lora_b = (scaling * B @ A).T.

Module names: HF T5 ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}`` ->
``encoder/layers_{i}/attention/{query,key,value,out}``, ``encoder.block.{i}.layer.1.DenseReluDense.
{wi,wi_0,wi_1,wo}`` -> ``encoder/layers_{i}/mlp/...``; decoder ``layer.0`` -> ``self_attention``,
``layer.1.EncDecAttention`` -> ``encoder_decoder_attention``, ``layer.2.DenseReluDense`` -> ``mlp``.

Refused with a `LibraryError` naming the file and field: missing ``r``/``lora_alpha``, a non-LORA
``peft_type``, DoRA (``use_dora``), ``bias`` other than 'none', ``lora_bias``, non-empty
``rank_pattern``/``alpha_pattern`` (per-module ranks/scales: one scale per expert here),
``modules_to_save``, module names that are not T5 linear sites, keys of other PEFT methods, and
``adapter_model.bin`` (pickle) without a safetensors file. ``fan_in_fan_out`` only changes how PEFT
merges ΔW into Conv1D weights; for T5's ``nn.Linear`` layers A and B keep their layout, so it is
recorded and otherwise ignored.

Letters: D site input width, F site output width, R LoRA rank.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

from phatgoose_jax.checkpoints import hf as hf_checkpoint
from phatgoose_jax.library import format as fmt
from phatgoose_jax.library.format import LibraryError

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.([^.]+))?\.weight$")
# The HF module class each t5x sub-layer must carry (a SelfAttention under decoder layer.1 is not a
# cross-attention site); the name mapping itself is the checkpoint reader's.
_SITE_CLASS = {"attention": "SelfAttention", "self_attention": "SelfAttention",
               "encoder_decoder_attention": "EncDecAttention", "mlp": "DenseReluDense"}


def hf_module_to_site(module: str) -> Optional[str]:
  """HF T5 module name (``encoder.block.0.layer.0.SelfAttention.q``) -> t5x site, or None."""
  path, _ = hf_checkpoint.hf_name_to_t5x(module + ".weight")
  if path is None or not path.endswith("/kernel") or "/layers_" not in path:
    return None
  site = path[: -len("/kernel")]
  parts = module.split(".")
  if len(parts) != 7 or _SITE_CLASS.get(site.split("/")[2]) != parts[5]:
    return None
  return site


def _site_order(site: str) -> Tuple[int, int, int, int, int]:
  """Sort key putting sites in network order (query, key, value, out; wi_0, wi_1, wo)."""
  stack, layer, module, leaf = site.split("/")
  modules = ("attention", "self_attention", "encoder_decoder_attention", "mlp")
  leaves = ("query", "key", "value", "out", "wi")
  if leaf in leaves:
    leaf_key = (leaves.index(leaf), 0)
  elif leaf.startswith("wi_"):
    leaf_key = (4, int(leaf[3:]))
  else:  # wo
    leaf_key = (5, 0)
  return (stack != "encoder", int(layer.split("_")[1]), modules.index(module)) + leaf_key


def _targets_module(target_modules: Any, module: str) -> bool:
  if target_modules is None:
    return True
  if isinstance(target_modules, str):  # PEFT: a regex matched against the full module name.
    return re.fullmatch(target_modules, module) is not None
  leaf = module.split(".")[-1]
  return any(module == t or module.endswith("." + t) or leaf == t for t in target_modules)


def read_peft_config(adapter_dir: str) -> Tuple[Dict[str, Any], float]:
  """Reads and validates ``adapter_config.json``; returns ``(config, scale)``."""
  path = os.path.join(adapter_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise LibraryError(f"{adapter_dir} is not a PEFT adapter: {CONFIG_FILE} is missing")
  config = fmt.read_json(path, "PEFT adapter config")

  def bad(field: str, why: str) -> LibraryError:
    return LibraryError(f"{path}: field {field!r} {why}")

  peft_type = config.get("peft_type", "LORA")
  if str(peft_type).upper() != "LORA":
    raise bad("peft_type", f"is {peft_type!r}; only LORA adapters can be imported")
  if "r" not in config:
    raise bad("r", "is missing")
  r = config["r"]
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise bad("r", f"must be a positive int, got {r!r}")
  if "lora_alpha" not in config:
    raise bad("lora_alpha", "is missing")
  alpha = config["lora_alpha"]
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
    raise bad("lora_alpha", f"must be a number, got {alpha!r}")
  if config.get("use_dora"):
    raise bad("use_dora", "is true: DoRA adapters (magnitude vectors) are not LoRA experts")
  if config.get("bias", "none") != "none":
    raise bad("bias", f"is {config.get('bias')!r}; only 'none' is supported (a LoRA expert has "
              "no bias terms)")
  if config.get("lora_bias"):
    raise bad("lora_bias", "is true; LoRA-B biases are not supported")
  for field in ("rank_pattern", "alpha_pattern"):
    if config.get(field):
      raise bad(field, f"is {config[field]!r}: per-module ranks/alphas are not supported (one "
                "rank and scale per expert)")
  if config.get("modules_to_save"):
    raise bad("modules_to_save", f"is {config['modules_to_save']!r}: fully fine-tuned modules "
              "are not part of a LoRA expert")
  targets = config.get("target_modules")
  if targets is not None and not isinstance(targets, str) and not (
      isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
    raise bad("target_modules", f"must be null, a regex string or a list of module names, got "
              f"{targets!r}")
  use_rslora = bool(config.get("use_rslora", False))
  scale = float(alpha) / (math.sqrt(r) if use_rslora else r)
  return config, scale


def import_peft_adapter(adapter_dir: str
                        ) -> Tuple[Dict[str, Dict[str, np.ndarray]], float, Dict[str, Any]]:
  """Reads a PEFT LoRA adapter of a HF T5 model as t5x LoRA sites.

  Args:
    adapter_dir: a directory written by ``PeftModel.save_pretrained`` (``adapter_config.json`` +
      ``adapter_model.safetensors``).

  Returns:
    ``(lora, scale, info)``: ``lora = {site: {'lora_a': [D, R], 'lora_b': [R, F]}}`` in network
    order (dtype as stored), ``scale`` = lora_alpha / r (or / sqrt(r) for rsLoRA), and ``info``
    (r, lora_alpha, use_rslora, target_modules, peft_version, base_model_name_or_path, source,
    import_kind='hf_peft', weights_sha256) suitable as library provenance.

  Raises:
    LibraryError: naming the file and field for any malformed or unsupported adapter.
  """
  adapter_dir = os.fspath(adapter_dir)
  config, scale = read_peft_config(adapter_dir)
  weights = os.path.join(adapter_dir, SAFETENSORS_FILE)
  if not os.path.isfile(weights):
    if os.path.isfile(os.path.join(adapter_dir, BIN_FILE)):
      raise LibraryError(
          f"{os.path.join(adapter_dir, BIN_FILE)}: pickled PyTorch adapters are not read (unsafe "
          f"to unpickle); re-save with PeftModel.save_pretrained(..., safe_serialization=True) "
          f"to get {SAFETENSORS_FILE}")
    raise LibraryError(f"{adapter_dir}: {SAFETENSORS_FILE} is missing")
  with open(weights, "rb") as f:
    data = f.read()
  tensors = fmt.parse_safetensors(data, weights)
  r = config["r"]
  target_modules = config.get("target_modules")
  parts: Dict[str, Dict[str, np.ndarray]] = {}
  adapter_names = set()
  for key, value in tensors.items():
    m = _KEY_RE.match(key)
    if m is None:
      raise LibraryError(f"{weights}: tensor {key!r} is not a LoRA lora_A/lora_B weight (other "
                         "PEFT methods, DoRA magnitudes or embedding LoRAs are not supported)")
    module, which, adapter_name = m.groups()
    if adapter_name is not None:
      adapter_names.add(adapter_name)
    site = hf_module_to_site(module)
    if site is None:
      raise LibraryError(f"{weights}: tensor {key!r}: module {module!r} is not a T5 linear site "
                         "(expected e.g. encoder.block.0.layer.0.SelfAttention.q or "
                         "decoder.block.1.layer.2.DenseReluDense.wo)")
    if not _targets_module(target_modules, module):
      raise LibraryError(f"{weights}: tensor {key!r}: module {module!r} is not in "
                         f"{CONFIG_FILE} field 'target_modules' {target_modules!r}")
    if value.ndim != 2:
      raise LibraryError(f"{weights}: tensor {key!r} has shape {list(value.shape)}, expected 2-D")
    slot = parts.setdefault(site, {})
    if which in slot:
      raise LibraryError(f"{weights}: two {which} tensors for module {module!r}")
    slot[which] = value
  if len(adapter_names) > 1:
    raise LibraryError(f"{weights}: holds several adapters {sorted(adapter_names)}; save one")
  if not parts:
    raise LibraryError(f"{weights}: holds no LoRA tensors")
  lora: Dict[str, Dict[str, np.ndarray]] = {}
  for site in sorted(parts, key=_site_order):
    slot = parts[site]
    if set(slot) != {"lora_A", "lora_B"}:
      raise LibraryError(f"{weights}: site {site} has {sorted(slot)} but needs lora_A and lora_B")
    a, b = slot["lora_A"], slot["lora_B"]  # [r, in], [out, r]
    if a.shape[0] != r or b.shape[1] != r:
      raise LibraryError(f"{weights}: site {site}: lora_A {list(a.shape)} / lora_B "
                         f"{list(b.shape)} disagree with {CONFIG_FILE} field 'r' = {r}")
    lora[site] = {"lora_a": np.ascontiguousarray(a.T),   # [D, R]
                  "lora_b": np.ascontiguousarray(b.T)}   # [R, F]
  info = {
      "import_kind": "hf_peft",
      "source": os.path.abspath(adapter_dir),
      "r": r,
      "lora_alpha": config["lora_alpha"],
      "use_rslora": bool(config.get("use_rslora", False)),
      "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
      "target_modules": target_modules,
      "peft_version": config.get("peft_version"),
      "base_model_name_or_path": config.get("base_model_name_or_path"),
      "weights_sha256": fmt.sha256_bytes(data),
  }
  return lora, scale, info


def add_peft_adapter(library: Any, name: str, adapter_dir: str, *, task: Optional[str] = None,
                     overwrite: bool = False, **kwargs) -> Dict[str, Any]:
  """Imports a PEFT adapter and adds it to an `ExpertLibrary` (provenance from `info`)."""
  lora, scale, info = import_peft_adapter(adapter_dir)
  return library.add(name, lora, scale, task=task, provenance=info, overwrite=overwrite, **kwargs)
