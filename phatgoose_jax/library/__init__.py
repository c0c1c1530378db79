"""The on-disk expert library: LoRA experts (+ PHATGOOSE gates / prototypes) for one base T5.

* `format`: directory layout, metadata, atomic writes, verification (`LibraryError`).
* `library`: `ExpertLibrary` (create/open/add/set_vectors/remove/load/stack).
* `trees`: `to_adapters_tree`, `lora_from_adapters_tree`, `place_stacked`.
* `peft_import`: Hugging Face PEFT LoRA adapters -> t5x sites.
* `official_import`: official PyTorch PHATGOOSE ``best.pt`` -> t5x sites (needs the torch extra).

Typical use::

  lib = ExpertLibrary.create(path, params_fingerprint(params), t5_config)
  lib.add('task_a', *import_peft_adapter(dir)[:2], task='task_a')
  stacked = lib.stack(vectors='gate')                # {site: {'lora_a': [E, D, R], ...}}
  variables['adapters'] = to_adapters_tree(stacked)
"""
from phatgoose_jax.library.format import (FORMAT_VERSION, LibraryError, base_fingerprint,
                                          validate_kind, validate_name)
from phatgoose_jax.library.library import Expert, ExpertLibrary, site_shapes
from phatgoose_jax.library.trees import (lora_from_adapters_tree, place_stacked,
                                         to_adapters_tree)
from phatgoose_jax.library.official_import import (import_phatgoose_checkpoint,
                                                   import_phatgoose_experts)
from phatgoose_jax.library.peft_import import (add_peft_adapter, hf_module_to_site,
                                               import_peft_adapter)

__all__ = [
    "Expert", "ExpertLibrary", "FORMAT_VERSION", "LibraryError", "add_peft_adapter",
    "base_fingerprint", "hf_module_to_site", "import_peft_adapter", "import_phatgoose_checkpoint",
    "import_phatgoose_experts", "lora_from_adapters_tree", "place_stacked", "site_shapes",
    "to_adapters_tree", "validate_kind", "validate_name",
]
