"""Generates the HF PEFT reference numbers for `tests/test_merging.py`.

Not run by the tests (torch and peft are not runtime dependencies). Run with a
Python that has torch (CPU) and peft installed:

  python scripts/make_peft_merge_fixture.py [--out tests/testdata/peft_merging]

A tiny torch model with two `nn.Linear` layers of odd sizes receives PEFT LoRA
adapters with random non-zero A and B and `lora_alpha != r`; each merge method
of `LoraModel.add_weighted_adapter` is called and the merged adapter's factors
and scaling are saved, with the inputs, in PEFT's own layout:
`lora_A [r, in]`, `lora_B [out, r]`, delta W = scaling * B @ A, [out, in].
(`phatgoose_jax` stores the transposes: a [D=in, R], b [R, F=out].)
"""
import argparse
import json
import os
import warnings

import numpy as np
import peft
import torch
import transformers
from torch import nn

SEED = 1234
SITES = ("lin1", "lin2")
# Adapters with one rank (every method) and with different ranks (cat / *svd).
EQUAL = {"e0": (3, 5.0), "e1": (3, 7.0), "e2": (3, 2.0)}  # name: (r, alpha)
MIXED = {"m0": (2, 3.0), "m1": (4, 6.0)}
EQUAL_WEIGHTS = [0.7, -0.4, 1.3]
MIXED_WEIGHTS = [0.6, 0.9]

# case name -> (adapters, weights, add_weighted_adapter kwargs)
CASES = {
    "linear": ("equal", dict(combination_type="linear")),
    "cat": ("equal", dict(combination_type="cat")),
    "svd": ("equal", dict(combination_type="svd")),
    "svd_rank2": ("equal", dict(combination_type="svd", svd_rank=2)),
    "svd_clamp": ("equal", dict(combination_type="svd", svd_clamp=0.9)),
    "svd_reduced": ("equal", dict(combination_type="svd", svd_rank=4, svd_full_matrices=False)),
    "ties": ("equal", dict(combination_type="ties", density=0.6)),
    "ties_frequency": ("equal", dict(combination_type="ties", density=0.6,
                                     majority_sign_method="frequency")),
    "ties_density1": ("equal", dict(combination_type="ties", density=1.0)),
    "dare_linear": ("equal", dict(combination_type="dare_linear", density=1.0)),
    "dare_ties": ("equal", dict(combination_type="dare_ties", density=1.0)),
    "magnitude_prune": ("equal", dict(combination_type="magnitude_prune", density=0.6)),
    "ties_svd": ("equal", dict(combination_type="ties_svd", density=0.6)),
    "dare_linear_svd": ("equal", dict(combination_type="dare_linear_svd", density=1.0)),
    "dare_ties_svd": ("equal", dict(combination_type="dare_ties_svd", density=1.0)),
    "magnitude_prune_svd": ("equal", dict(combination_type="magnitude_prune_svd", density=0.6)),
    "mixed_cat": ("mixed", dict(combination_type="cat")),
    "mixed_svd": ("mixed", dict(combination_type="svd")),
    "mixed_svd_rank3": ("mixed", dict(combination_type="svd", svd_rank=3)),
    "mixed_ties_svd": ("mixed", dict(combination_type="ties_svd", density=0.6)),
    # One adapter: PEFT silently switches every method to "linear".
    "single_ties": ("single", dict(combination_type="ties", density=0.6)),
}


class Tiny(nn.Module):
  """Two odd-sized linear layers: 13 -> 11 -> 7."""

  def __init__(self):
    super().__init__()
    self.lin1 = nn.Linear(13, 11)
    self.lin2 = nn.Linear(11, 7)

  def forward(self, x):
    return self.lin2(torch.relu(self.lin1(x)))


def build(adapters: dict[str, tuple[int, float]]) -> peft.PeftModel:
  """Base model with the given LoRA adapters, all factors random non-zero."""
  torch.manual_seed(SEED)
  base = Tiny()
  model = None
  for name, (r, alpha) in adapters.items():
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(SITES),
                          lora_dropout=0.0, init_lora_weights=True)
    if model is None:
      model = peft.get_peft_model(base, cfg, adapter_name=name)
    else:
      model.add_adapter(name, cfg)
  gen = torch.Generator().manual_seed(SEED + 1)
  with torch.no_grad():
    for site in SITES:
      layer = getattr(model.base_model.model, site)
      for name in adapters:
        for mod in (layer.lora_A[name], layer.lora_B[name]):
          mod.weight.copy_(0.6 * torch.randn(mod.weight.shape, generator=gen))
  return model


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "..", "tests", "testdata", "peft_merging"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  warnings.simplefilter("ignore")

  groups = {
      "equal": (EQUAL, EQUAL_WEIGHTS),
      "mixed": (MIXED, MIXED_WEIGHTS),
      "single": ({"e0": EQUAL["e0"]}, [0.8]),
  }
  inputs = {}
  for group, (adapters, weights) in groups.items():
    model = build(adapters)
    inputs[f"{group}/weights"] = np.asarray(weights, np.float64)
    for site in SITES:
      layer = getattr(model.base_model.model, site)
      for name in adapters:
        inputs[f"{group}/{site}/{name}/lora_A"] = layer.lora_A[name].weight.detach().numpy()
        inputs[f"{group}/{site}/{name}/lora_B"] = layer.lora_B[name].weight.detach().numpy()
        inputs[f"{group}/{site}/{name}/scaling"] = np.float64(layer.scaling[name])

  merged = {}
  meta = {}
  for case, (group, kwargs) in CASES.items():
    adapters, weights = groups[group]
    model = build(adapters)
    model.add_weighted_adapter(list(adapters), list(weights), "merged", **kwargs)
    meta[case] = {"group": group, **kwargs}
    for site in SITES:
      layer = getattr(model.base_model.model, site)
      merged[f"{case}/{site}/lora_A"] = layer.lora_A["merged"].weight.detach().numpy()
      merged[f"{case}/{site}/lora_B"] = layer.lora_B["merged"].weight.detach().numpy()
      merged[f"{case}/{site}/scaling"] = np.float64(layer.scaling["merged"])
      merged[f"{case}/{site}/delta"] = layer.get_delta_weight("merged").detach().numpy()

  np.savez_compressed(os.path.join(args.out, "inputs.npz"), **inputs)
  np.savez_compressed(os.path.join(args.out, "merged.npz"), **merged)
  with open(os.path.join(args.out, "cases.json"), "w") as f:
    json.dump({"versions": {"torch": torch.__version__, "peft": peft.__version__,
                            "transformers": transformers.__version__,
                            "numpy": np.__version__},
               "seed": SEED, "cases": meta}, f, indent=1, sort_keys=True)
  print("wrote", len(inputs), "input arrays and", len(merged), "merged arrays to", args.out)


if __name__ == "__main__":
  main()
