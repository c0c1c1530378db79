"""The demo's base model: its SentencePiece vocabulary and a brief full-parameter pretraining.

Stages 1-2 of `phatgoose_jax.demo` (see its docstring): `build_vocabulary` trains a SentencePiece
model with T5 ids on the synthetic corpus (`DemoVocabulary` exposes the small tokenizer interface
the pipeline and scorer use), and `pretrain_base` trains a small T5.1.1 from scratch on the same
corpus with prefix-LM and word-deletion denoising examples (`pretraining_examples`).

Letters: B batch, T target length, V vocabulary.
"""
from __future__ import annotations

import os
import random
from typing import Dict, List, Sequence

import numpy as np


class DemoVocabulary:
  """A SentencePiece model with T5 ids behind the small tokenizer interface the pipeline, scorer and
  detokeniser use (``encode``, ``decode``, an int ``eos_id``, ``GetPieceSize``, ``unk_id``); no
  TensorFlow import, unlike ``seqio.SentencePieceVocabulary``."""

  eos_id = 1
  pad_id = 0

  def __init__(self, processor):
    self.sp = processor

  def encode(self, text: str) -> List[int]:
    return list(self.sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def GetPieceSize(self) -> int:  # pylint: disable=invalid-name
    return self.sp.GetPieceSize()

  def unk_id(self) -> int:
    return self.sp.unk_id()

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))


def build_vocabulary(cfg: DemoConfig, directory: str):
  """Trains the SentencePiece model; returns (`DemoVocabulary`, corpus lines).

  The skill words get user-defined pieces (``'▁reverse'``, ...): the unigram trainer otherwise
  splits them into letters on this tiny corpus, and one piece per word keeps the heatmap readable.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import synthetic, vocab  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.demo import DemoError  # pylint: disable=g-import-not-at-top
  corpus = synthetic.synthetic_corpus(cfg.corpus_lines, cfg.seed)
  path = os.path.join(directory, "spiece.model")
  model = vocab.build_sentencepiece_model(
      corpus, path, cfg.vocab_pieces, seed=cfg.seed,
      user_defined_symbols=["\u2581" + w for w in synthetic.SKILLS])
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(model)
  sp = DemoVocabulary(sp)
  if sp.GetPieceSize() > cfg.vocab_size:
    raise DemoError(f"vocab_size={cfg.vocab_size} < {sp.GetPieceSize()} SentencePiece pieces")
  return sp, corpus


def pretraining_examples(corpus: Sequence[str], rng: random.Random) -> List[Dict[str, str]]:
  """One text-to-text example per corpus line: prefix-LM or word-deletion denoising (50/50).

  Prefix LM: input = the first k words, target = the rest (1 <= k < n). Denoising: input = the line
  with each word deleted with probability 0.15 (at least one kept), target = the whole line.
  """
  out = []
  for line in corpus:
    words = line.split()
    if len(words) >= 2 and rng.random() < 0.5:
      k = rng.randint(1, len(words) - 1)
      out.append({"inputs": " ".join(words[:k]), "targets": " ".join(words[k:])})
    else:
      kept = [w for w in words if rng.random() >= 0.15] or words[:1]
      out.append({"inputs": " ".join(kept), "targets": line})
  return out


def pretrain_base(cfg: DemoConfig, sp, corpus: Sequence[str], progress: Progress):
  """Full-parameter pretraining of the base T5 (a small jitted loop; the `Trainer` trains adapters
  only). AdamW, 6 % warmup then constant (the package's optimiser), global-norm clip 1.0."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.models import Transformer, cross_entropy_loss  # pylint: disable=g-import-not-at-top
  from phatgoose_jax import training  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.demo import lengths, t5_config  # pylint: disable=g-import-not-at-top

  config = t5_config(cfg)
  model = Transformer(config)
  params = model.init({"params": jax.random.key(cfg.seed)}, np.ones((1, 4), np.int32),
                      np.ones((1, 3), np.int32), np.ones((1, 3), np.int32),
                      enable_dropout=False)["params"]
  tx = training.adamw_optimizer(learning_rate=cfg.pretrain_lr, total_steps=cfg.pretrain_steps)
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                         enable_dropout=False)  # [B, T, V]
    loss, _ = cross_entropy_loss(logits, batch["decoder_target_tokens"],
                                 batch["decoder_loss_weights"])
    return loss

  @jax.jit
  def step(p, o, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  examples = pretraining_examples(corpus, random.Random(f"pretrain/{cfg.seed}"))
  batches = pipeline.iterate_numpy_batches(examples, sp, lengths(cfg), cfg.pretrain_batch,
                                           shuffle=True, seed=cfg.seed, num_epochs=None,
                                           drop_remainder=True)
  last = None
  window = max(cfg.pretrain_steps // 5, 1)
  for i in range(cfg.pretrain_steps):
    params, opt_state, loss = step(params, opt_state, next(batches))
    if (i + 1) % window == 0 or i + 1 == cfg.pretrain_steps:
      last = float(loss)
      progress.line(f"  pretrain step {i + 1}/{cfg.pretrain_steps} loss {last:.3f}")
  return config, jax.device_get(params), {"final_loss": last}
