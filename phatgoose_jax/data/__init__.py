"""Data room: vocabularies, sources, preprocessors, seqio tasks and batches.

Submodules (one concept each):
  vocab          T5-id SentencePiece models (`build_sentencepiece_model`,
                 gin-configurable `get_vocabulary`)
  sources        seqio DataSources: HF datasets, TFDS, JSONL, parquet, TFRecord
  preprocessors  field renaming, P3 rows, empty filtering, truncation, rank
                 classification + its postprocessor and metrics
  synthetic      offline synthetic expert / held-out tasks for the demo
  registry       `MIXTURE_OR_TASK_MODULE` import and task lookup
  pipeline       t5x-layout numpy batches (seqio or pure python), resume state
  p3_tasks, t0_tasks, flan_tasks, bigbench_tasks
                 seqio registrations of the paper's task families (see docs/datasets.md)
  rouge          dependency-free ROUGE-1/2/L (BIG-bench generative tasks, P3 validation)
  bleu, squad    dependency-free corpus BLEU and SQuAD EM/F1 (P3 validation, as the official
                 scorer)

Attributes are loaded lazily so `import phatgoose_jax.data` does not import
TensorFlow; `sources` and the seqio functions import it when first used.
"""

import importlib
from typing import Any

_EXPORTS = {
    "build_sentencepiece_model": "vocab",
    "get_vocabulary": "vocab",
    "VocabularyError": "vocab",
    "make_source": "sources",
    "JsonlDataSource": "sources",
    "ParquetDataSource": "sources",
    "HuggingFaceDataSource": "sources",
    "DataSourceError": "sources",
    "rank_classification": "preprocessors",
    "rank_classification_rows": "preprocessors",
    "rank_classification_accuracy": "preprocessors",
    "exact_match_accuracy": "preprocessors",
    "answer_choices_instance_text": "preprocessors",
    "SYNTHETIC_EXPERT_TASKS": "synthetic",
    "SYNTHETIC_HELDOUT_TASKS": "synthetic",
    "generate_examples": "synthetic",
    "synthetic_corpus": "synthetic",
    "register_synthetic_tasks": "synthetic",
    "import_task_module": "registry",
    "get_task_or_mixture": "registry",
    "get_dataset": "pipeline",
    "encode_examples": "pipeline",
    "iterate_numpy_batches": "pipeline",
    "DataIterator": "pipeline",
}
_SUBMODULES = ("vocab", "sources", "preprocessors", "synthetic", "registry",
               "pipeline", "catalog", "p3_tasks", "t0_tasks", "flan_tasks", "bigbench_tasks",
               "rouge", "bleu", "squad")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
