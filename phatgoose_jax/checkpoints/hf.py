"""Reader for Hugging Face ``T5ForConditionalGeneration`` folders (``config.json`` + safetensors).

Maps HF names and layouts onto t5x's T5.1.1 tree (see ``shapes.py``):

  HF (PyTorch ``nn.Linear`` weight is [out, in])          t5x (kernel is [in, out])
  ``shared.weight`` [V, D]                                 ``token_embedder/embedding`` [V, D]
  ``{enc}.block.i.layer.0.SelfAttention.{q,k,v,o}``        ``encoder/layers_i/attention/{query,key,value,out}/kernel`` (.T)
  ``{enc}.block.0.layer.0.SelfAttention.relative_attention_bias`` [N, H]
                                                           ``encoder/relpos_bias/rel_embedding`` [H, N] (.T)
  ``{enc}.block.i.layer.0.layer_norm``                     ``encoder/layers_i/pre_attention_layer_norm/scale``
  ``{enc}.block.i.layer.1.DenseReluDense.{wi,wi_0,wi_1,wo}``  ``encoder/layers_i/mlp/.../kernel`` (.T)
  ``{enc}.block.i.layer.1.layer_norm``                     ``encoder/layers_i/pre_mlp_layer_norm/scale``
  ``{dec}.block.i.layer.0`` self-attention / ``layer.1`` ``EncDecAttention`` / ``layer.2`` MLP
                                                           ``self_attention`` / ``encoder_decoder_attention`` / ``mlp``
                                                           with ``pre_{self,cross}_attention_layer_norm``, ``pre_mlp_layer_norm``
  ``{enc,dec}.final_layer_norm``                           ``encoder/encoder_norm``, ``decoder/decoder_norm``
  ``lm_head.weight`` [V, D]                                ``decoder/logits_dense/kernel`` [D, V] (.T)

Output projection. HF 4.x rescales the decoder output by ``d_model**-0.5`` exactly when
``tie_word_embeddings`` is true (T5.1.0); transformers 5.x spells that ``scale_decoder_outputs``.
t5x's ``logits_via_embedding=True`` computes ``attend(y) / sqrt(emb_dim)``, which is the same
function, so tied + rescaled maps to ``logits_via_embedding=True``. Tied without rescaling maps to
an explicit ``logits_dense`` copied from the embedding; untied with rescaling has no t5x
equivalent and is refused.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Dict, Optional, Tuple

import numpy as np

from phatgoose_jax.checkpoints.shapes import CheckpointError
from phatgoose_jax.models.config import T5Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF feed_forward_proj -> t5x mlp_activations. HF's 'gated-gelu' uses gelu_new (tanh form), which
# is flax's default ``gelu(approximate=True)``. Plain 'gelu' (exact erf) has no t5x name here.
_FEED_FORWARD = {
    "gated-gelu": ("gelu", "linear"),
    "gated-gelu_new": ("gelu", "linear"),
    "relu": ("relu",),
    "gated-relu": ("relu", "linear"),
    "gated-silu": ("silu", "linear"),
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def is_hf_folder(path: str) -> bool:
  """True if ``path`` is a directory with ``config.json`` and safetensors weights."""
  return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE)) and
          (os.path.isfile(os.path.join(path, WEIGHTS_FILE)) or
           os.path.isfile(os.path.join(path, INDEX_FILE))))


def _get(hf: Dict[str, Any], key: str, default: Any) -> Any:
  value = hf.get(key, default)
  return default if value is None else value


def config_from_hf(hf: Dict[str, Any], source: str = CONFIG_FILE) -> Tuple[T5Config, bool]:
  """Translates an HF T5 ``config.json`` dict into a T5Config.

  Args:
    hf: the parsed ``config.json``.
    source: path quoted in error messages.

  Returns:
    ``(config, copy_embedding_to_logits)``: the second is True for a tied, un-rescaled output
    projection, which is stored as an explicit ``logits_dense`` copied from the embedding.

  Raises:
    CheckpointError: naming the field for architectures t5x's T5.1.1 tree cannot represent.
  """
  if not isinstance(hf, dict):
    raise CheckpointError(f"{source}: expected a JSON object of T5 settings, got "
                          f"{type(hf).__name__}")
  model_type = hf.get("model_type", "t5")
  if model_type not in ("t5", "mt5"):
    raise CheckpointError(
        f"{source}: model_type {model_type!r} is not supported (expected 't5' or 'mt5'; umT5 has "
        f"per-layer relative position biases, which the t5x T5.1.1 tree does not have)")
  proj = str(_get(hf, "feed_forward_proj", "relu"))
  if proj not in _FEED_FORWARD:
    raise CheckpointError(
        f"{source}: feed_forward_proj {proj!r} is not supported "
        f"(supported: {', '.join(sorted(_FEED_FORWARD))})")
  tie = bool(_get(hf, "tie_word_embeddings", True))
  scale = bool(_get(hf, "scale_decoder_outputs", tie))
  if scale and not tie:
    raise CheckpointError(
        f"{source}: scale_decoder_outputs=true with tie_word_embeddings=false (an untied lm_head "
        f"applied to a d_model**-0.5-rescaled decoder output) cannot be represented: t5x only "
        f"rescales when logits_via_embedding is true")
  try:
    num_layers = int(_get(hf, "num_layers", 6))
    config = T5Config(
        vocab_size=int(_get(hf, "vocab_size", 32128)),
        emb_dim=int(_get(hf, "d_model", 512)),
        num_heads=int(_get(hf, "num_heads", 8)),
        num_encoder_layers=num_layers,
        num_decoder_layers=int(_get(hf, "num_decoder_layers", num_layers)),
        head_dim=int(_get(hf, "d_kv", 64)),
        mlp_dim=int(_get(hf, "d_ff", 2048)),
        mlp_activations=_FEED_FORWARD[proj],
        dropout_rate=float(_get(hf, "dropout_rate", 0.1)),
        logits_via_embedding=tie and scale,
        relative_attention_num_buckets=int(_get(hf, "relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(_get(hf, "relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(_get(hf, "layer_norm_epsilon", 1e-6)),
    )
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: invalid T5 configuration: {e}") from e
  return config, tie and not scale


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Reads every tensor of a ``.safetensors`` file into numpy (BF16 via ml_dtypes).

  Raises:
    CheckpointError: naming ``path`` if the header is malformed or a dtype is unknown.
  """
  # Memory-mapped: each tensor is copied once out of the page cache, so the peak is about one
  # checkpoint's size, not two (T5-XL float32 is 11 GB).
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    try:
      (header_len,) = struct.unpack("<Q", head)
      if header_len > size - 8:
        raise ValueError(f"header length {header_len} exceeds the file size {size}")
      header = json.loads(f.read(header_len))
    except (struct.error, ValueError) as e:
      raise CheckpointError(f"{path} is not a safetensors file: {e}") from e
  body = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
          if size > 8 + header_len else np.zeros((0,), np.uint8))
  tensors = {}
  if not isinstance(header, dict):
    raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if (not isinstance(info, dict) or not isinstance(info.get("dtype"), str)
        or not isinstance(info.get("shape"), list)
        or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2):
      raise CheckpointError(f"{path}: header entry of tensor {name!r} needs 'dtype', 'shape' and "
                            f"'data_offsets' [start, end], got {info!r}")
    dtype_name = info["dtype"]
    if dtype_name == "BF16":
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      dtype = np.dtype(ml_dtypes.bfloat16)
    elif dtype_name in _SAFETENSORS_DTYPES:
      dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name]).newbyteorder("<")
    else:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
    start, end = info["data_offsets"]
    expected = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
    if end > len(body) or end - start != expected:
      raise CheckpointError(f"{path}: tensor {name!r} needs bytes {start}..{end} of a "
                            f"{len(body)}-byte data section (truncated or corrupted file)")
    array = body[start:end].view(dtype).reshape(info["shape"])
    tensors[name] = array.astype(array.dtype.newbyteorder("="), copy=True)
  del body  # close the map; every tensor above is an owned copy
  return tensors


def _read_hf_tensors(path: str) -> Dict[str, np.ndarray]:
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
    return read_safetensors(os.path.join(path, WEIGHTS_FILE))
  try:
    with open(index_path, "r", encoding="utf-8") as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read the safetensors index {index_path}: {e}") from e
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index_path} has no 'weight_map' of tensor name -> shard file")
  tensors: Dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(path, shard)
    if not os.path.isfile(shard_path):
      raise CheckpointError(f"{index_path} names shard {shard!r}, which is missing from {path}")
    tensors.update(read_safetensors(shard_path))
  return tensors


_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
# (stack, sub-layer index) -> (t5x module for attention or mlp, t5x layer-norm name).
_SUBLAYERS = {
    ("encoder", "0"): ("attention", "pre_attention_layer_norm"),
    ("encoder", "1"): ("mlp", "pre_mlp_layer_norm"),
    ("decoder", "0"): ("self_attention", "pre_self_attention_layer_norm"),
    ("decoder", "1"): ("encoder_decoder_attention", "pre_cross_attention_layer_norm"),
    ("decoder", "2"): ("mlp", "pre_mlp_layer_norm"),
}
_BLOCK = re.compile(
    r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\."
    r"(?:(?:SelfAttention|EncDecAttention)\.(q|k|v|o|relative_attention_bias)|"
    r"DenseReluDense\.(wi|wi_\d+|wo)|(layer_norm))\.weight$")


def hf_name_to_t5x(name: str) -> Tuple[Optional[str], bool]:
  """Maps one HF tensor name to ``(t5x path, transpose)``; ``(None, False)`` if not a T5 weight."""
  if name == "shared.weight":
    return "token_embedder/embedding", False
  if name == "lm_head.weight":
    return "decoder/logits_dense/kernel", True
  if name in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
    stack = name.split(".")[0]
    return f"{stack}/{stack}_norm/scale", False
  m = _BLOCK.match(name)
  if m is None:
    return None, False
  stack, block, sub, attn, mlp, norm = m.groups()
  if (stack, sub) not in _SUBLAYERS:
    return None, False
  module, norm_name = _SUBLAYERS[(stack, sub)]
  prefix = f"{stack}/layers_{block}"
  if norm:
    return f"{prefix}/{norm_name}/scale", False
  if attn == "relative_attention_bias":
    # Only block 0 carries the table; t5x keeps one per stack.
    return (f"{stack}/relpos_bias/rel_embedding", True) if block == "0" else (None, False)
  if attn:
    return (f"{prefix}/{module}/{_ATTENTION[attn]}/kernel", True) if module != "mlp" else (None, False)
  return (f"{prefix}/{module}/{mlp}/kernel", True) if module == "mlp" else (None, False)


def read_hf_folder(path: str) -> Tuple[T5Config, Dict[str, np.ndarray]]:
  """Reads an HF T5 folder into the t5x tree.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).

  Returns:
    ``(config inferred from config.json, {'/'-path: numpy array})``, values as stored.

  Raises:
    CheckpointError: for unsupported configs, unknown tensors, or inconsistent tied embeddings.
  """
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(config_path, "r", encoding="utf-8") as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read HF config {config_path}: {e}") from e
  config, copy_embedding = config_from_hf(hf, config_path)
  tensors = _read_hf_tensors(path)

  # Embeddings: encoder/decoder embed_tokens are the same Parameter as shared.weight.
  aliases = [n for n in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") if n in tensors]
  if "shared.weight" not in tensors and aliases:
    tensors["shared.weight"] = tensors[aliases[0]]
  for alias in aliases:
    if not np.array_equal(tensors.pop(alias), tensors["shared.weight"]):
      raise CheckpointError(
          f"HF checkpoint {path}: {alias} differs from shared.weight; T5 ties both embedding "
          f"tables to one matrix")

  lm_head = tensors.pop("lm_head.weight", None)
  if config.logits_via_embedding:
    if lm_head is not None and not np.array_equal(lm_head, tensors.get("shared.weight")):
      raise CheckpointError(
          f"HF checkpoint {path}: tie_word_embeddings is true (with decoder-output rescaling) but "
          f"lm_head.weight differs from shared.weight; refusing to guess which one is meant")
  elif lm_head is not None:
    tensors["lm_head.weight"] = lm_head
  elif copy_embedding and "shared.weight" in tensors:
    tensors["lm_head.weight"] = tensors["shared.weight"]

  flat: Dict[str, np.ndarray] = {}
  for name in sorted(tensors):
    t5x_name, transpose = hf_name_to_t5x(name)
    if t5x_name is None:
      raise CheckpointError(f"HF checkpoint {path}: unexpected tensor {name!r} (no t5x equivalent)")
    value = tensors[name]
    flat[t5x_name] = np.ascontiguousarray(value.T) if transpose else value
  return config, flat


__all__ = ["config_from_hf", "hf_name_to_t5x", "is_hf_folder", "read_hf_folder", "read_safetensors"]
