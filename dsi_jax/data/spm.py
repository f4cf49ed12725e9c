"""A SentencePiece vocabulary trained on a corpus's own documents (the T5 path's tokenizer).

T5 models trained from scratch read SentencePiece tokens. Rather than download T5's 32k
vocabulary, `train_sentencepiece` fits a small one (a few thousand pieces) to the indexed
documents of a corpus and writes it as `spm.model` in the corpus folder, beside `corpus.json`.
The model keeps T5's special ids, which `seqio.SentencePieceVocabulary` expects: 0 = pad,
1 = eos, 2 = unk, no bos.

Training is deterministic: one thread, every sentence read (no sampling or shuffling), so the
same documents and options give the same bytes. The file is written to a temporary sibling and
renamed into place, so a reader never sees half a model. Only the `sentencepiece` package is
needed (no TensorFlow); `dsi_jax.tasks` wraps the file as a SeqIO vocabulary.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable

SPM_FILE = "spm.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
DEFAULT_VOCAB_SIZE = 8000
MODEL_TYPES = ("unigram", "bpe")
# Longest "sentence" (bytes) the trainer reads; documents are split into lines first.
MAX_SENTENCE_BYTES = 1 << 16


def _sentences(texts: Iterable[str]) -> list[str]:
  out = []
  for text in texts:
    out.extend(line for line in (s.strip() for s in str(text).splitlines()) if line)
  return out


def train_sentencepiece(
  texts: Iterable[str],
  path: str | os.PathLike,
  *,
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  model_type: str = "unigram",
  character_coverage: float = 0.9995,
  byte_fallback: bool = True,
) -> str:
  """Trains a SentencePiece model on `texts` and writes it atomically to `path`.

  Args:
    texts: the documents (each split into lines; empty lines are skipped).
    path: the model file to write (conventionally `<corpus folder>/spm.model`).
    vocab_size: pieces wanted, special ids included. A soft limit: a corpus too small to
      support that many pieces gets fewer rather than an error.
    model_type: "unigram" (T5's) or "bpe".
    character_coverage: share of the characters (by count) that get pieces of their own.
    byte_fallback: the other characters are spelled as UTF-8 byte pieces (256 of the
      vocabulary's ids) instead of mapping to unk, so any text round-trips; a question mark
      that the documents rarely use still reaches the model.

  Returns:
    The path written.

  Raises:
    ValueError: no text, an unknown model type, or a vocabulary too small for the specials.
  """
  import sentencepiece

  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
  smallest = 3 + (256 if byte_fallback else 0) + 5
  if vocab_size < smallest:
    raise ValueError(f"vocab_size must be at least {smallest}, got {vocab_size}")
  sentences = _sentences(texts)
  if not sentences:
    raise ValueError("no text to train a SentencePiece model on")
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_writer=model,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=character_coverage,
    byte_fallback=byte_fallback,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    hard_vocab_limit=False,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=MAX_SENTENCE_BYTES,
    minloglevel=2,
  )
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(model.getvalue())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def corpus_sentencepiece(
  folder: str | os.PathLike,
  texts: Iterable[str],
  *,
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  model_type: str = "unigram",
) -> str:
  """`<folder>/spm.model`, trained on `texts` unless it exists already; returns its path.

  An existing file is used as it is: it belongs to the corpus saved in the same folder, and
  `corpus.save_corpus` replaces the whole folder when the corpus changes. Delete the file to
  train again with other options.
  """
  path = os.path.join(os.fspath(folder), SPM_FILE)
  if os.path.isfile(path):
    return path
  return train_sentencepiece(texts, path, vocab_size=vocab_size, model_type=model_type)


def load(path: str | os.PathLike):
  """The `sentencepiece.SentencePieceProcessor` of a model file (for use without SeqIO)."""
  import sentencepiece

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: SentencePiece model not found")
  return sentencepiece.SentencePieceProcessor(model_file=path)
