"""Text corpora as flat token arrays, and the language-model batches cut from them.

Every corpus becomes a train and an eval token array. Train example = a window of T+1 tokens at a
random start (starts drawn for the global batch from (seed, step)); inputs are its first T tokens,
targets its last T. Eval examples are consecutive windows of T+1 tokens with stride T, so every
eval token after the first is a target exactly once; the last partial window is dropped. With
eval.max_examples = k < the window count, the k windows are taken at evenly spaced positions
(window floor(i n / k) for i < k), so a short eval covers the whole split, not its beginning.
`num_train_examples` / `num_eval_examples` count TOKENS of the two splits, not windows.

Corpora:
- python_stdlib (embedded): the bytes of the standard library's .py files (site-packages and
  __pycache__ excluded) in sorted path order, capped at data.max_bytes in that order (the file that
  crosses the cap is cut); files whose sorted index % 20 == 0 form the eval split. Vocab 256.
- tiny_shakespeare: characters; vocab = sorted distinct characters of the whole file (65); first
  90% of the characters train, the last 10% eval.
- ptb: words; vocab = sorted distinct words of ptb.train plus '<eos>' (10000); '<eos>' ends every
  line; ptb.valid is the eval split; words outside the vocab map to '<unk>'.
- ptb_chars: the characters of the same files as they stand (words, spaces, '<unk>', 'N' for
  numbers, a newline per sentence); vocab = sorted distinct characters of ptb.train (50);
  ptb.valid is the eval split. The byte-level counterpart of tiny_shakespeare on a 5x larger corpus.
- text_files: bytes of the files matched by data.train_files / data.eval_files (comma-separated
  glob patterns, `**` allowed), sorted per pattern, concatenated. Vocab 256.
- wikitext103: wiki.{train,valid}.raw (or .tokens) from <root>/wikitext-103-raw/,
  <root>/wikitext-103/ or <root>; GPT-2 BPE through tiktoken (vocab 50257), tokenised once and
  cached as uint16 .npy in the cache folder, keyed by the file's sha256.
"""

from __future__ import annotations

import functools
import glob
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np
import tiktoken

from sift_jax import registry
from sift_jax.data import files
from sift_jax.data.base import METAS, STREAM_TEXT_WINDOWS, Batch, Dataset, rng

DEFAULT_MAX_BYTES = 20_000_000
BYTE_VOCAB = 256
GPT2_VOCAB = 50257
_STDLIB_EVAL_EVERY = 20


def text_seq_len(config: ml_collections.ConfigDict) -> int:
  """Tokens per example: data.seq_len, else the model's context length."""
  seq_len = int(config.data.seq_len or config.model.get('context_length', 0))
  if seq_len <= 0:
    raise ValueError(
      f'data.seq_len={config.data.seq_len} and model.context_length='
      f'{config.model.get("context_length")}: set one of them to the tokens per example'
    )
  return seq_len


class TextDataset(Dataset):
  """Language-model batches over a train and an eval token array."""

  kind = 'text'

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    train: np.ndarray,
    eval_tokens: np.ndarray,
    vocab_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
  ):
    super().__init__(config, process_index, process_count)
    seq_len = text_seq_len(config)
    name = config.data.name
    for split, tokens in (('train', train), ('eval', eval_tokens)):
      if len(tokens) < seq_len + 1:
        raise ValueError(
          f'dataset {name!r}: the {split} split has {len(tokens)} tokens, fewer than '
          f'seq_len + 1 = {seq_len + 1}'
        )
    self.seq_len = seq_len
    self.train_tokens = train
    self.eval_tokens = eval_tokens
    self.meta = {'vocab_size': int(vocab_size), 'seq_len': seq_len}
    self.num_train_examples = len(train)
    self.num_eval_examples = len(eval_tokens)
    self._num_eval_windows = (len(eval_tokens) - 1) // seq_len

  @staticmethod
  def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    w = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)  # (B, T+1)
    return {'inputs': w[:, :-1], 'targets': w[:, 1:]}  # (B, T) each

  def train_batch(self, step: int) -> Batch:
    high = len(self.train_tokens) - self.seq_len
    starts = rng(self.seed, STREAM_TEXT_WINDOWS, step).integers(0, high, size=self.batch_size)
    return self._windows(self.train_tokens, starts[self.host_rows(self.batch_size)], self.seq_len)

  def _train_count(self) -> int:
    return len(self.train_tokens) - self.seq_len  # window starts

  def _eval_count(self) -> int:
    return (len(self.eval_tokens) - 1) // self.seq_len

  def _eval_subset(self, n: int, k: int) -> np.ndarray:
    return np.arange(k) * n // k

  def _eval_rows(self, indices: np.ndarray) -> Batch:
    return self._windows(self.eval_tokens, indices * self.seq_len, self.seq_len)


Loader = Callable[[ml_collections.ConfigDict], tuple[np.ndarray, np.ndarray, int]]


def _register(name: str, vocab_size: int = 0) -> Callable[[Loader], Loader]:
  """Registers a corpus loader, (config) -> (train tokens, eval tokens, vocab size), as a dataset.

  A fixed `vocab_size` (bytes, a fixed tokenizer) lets `dataset_meta` skip loading the corpus.
  """

  def wrap(load: Loader) -> Loader:
    @registry.DATASETS.register(name)
    def build(
      config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
    ) -> TextDataset:
      train, eval_tokens, vocab_size = load(config)
      return TextDataset(
        config,
        train,
        eval_tokens,
        vocab_size,
        process_index=process_index,
        process_count=process_count,
      )

    if vocab_size:
      METAS[name] = lambda config: {'vocab_size': vocab_size, 'seq_len': text_seq_len(config)}
    return load

  return wrap


@functools.lru_cache(maxsize=2)
def _stdlib_corpus(stdlib: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  paths = []
  for folder, subdirs, names in os.walk(stdlib):
    subdirs[:] = [d for d in subdirs if d not in ('site-packages', 'dist-packages', '__pycache__')]
    paths += [os.path.relpath(os.path.join(folder, n), stdlib) for n in names if n.endswith('.py')]
  splits: tuple[list[bytes], list[bytes]] = ([], [])
  remaining = max_bytes
  for i, rel in enumerate(sorted(paths)):
    if remaining <= 0:
      break
    data = Path(stdlib, rel).read_bytes()[:remaining]
    remaining -= len(data)
    splits[i % _STDLIB_EVAL_EVERY == 0].append(data)
  train, eval_bytes = (np.frombuffer(b''.join(parts), np.uint8) for parts in splits)
  return train, eval_bytes


@_register('python_stdlib', BYTE_VOCAB)
def load_python_stdlib(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
  max_bytes = int(config.data.get('max_bytes', DEFAULT_MAX_BYTES))
  if max_bytes <= 0:
    raise ValueError(f'data.max_bytes={max_bytes}: need a positive byte cap')
  stdlib = sysconfig.get_paths()['stdlib']
  train, eval_bytes = _stdlib_corpus(stdlib, max_bytes)
  return train, eval_bytes, BYTE_VOCAB


def _code_points(text: bytes) -> np.ndarray:
  return np.frombuffer(text.decode('utf-8').encode('utf-32-le'), np.uint32)


def _char_ids(chars: np.ndarray, vocab: np.ndarray) -> np.ndarray:
  """Each code point's index in the sorted `vocab`, in the smallest integer type that holds it."""
  ids = np.searchsorted(vocab, chars)
  return ids.astype(np.uint8 if len(vocab) <= 256 else np.int32)


@functools.lru_cache(maxsize=2)
def _shakespeare(root: Path) -> tuple[np.ndarray, np.ndarray, int]:
  chars = _code_points(
    files.read_pinned('tiny_shakespeare', files.PINS['tiny_shakespeare'][0], root)
  )
  vocab = np.unique(chars)
  ids = _char_ids(chars, vocab)
  cut = int(0.9 * len(ids))
  return ids[:cut], ids[cut:], len(vocab)


@_register('tiny_shakespeare')
def load_tiny_shakespeare(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
  return _shakespeare(files.data_root(config))


def _ptb_words(pin: files.PinnedFile, root: Path) -> list[str]:
  lines = files.read_pinned('ptb', pin, root).decode().splitlines()
  return [w for line in lines for w in [*line.split(), '<eos>']]


@functools.lru_cache(maxsize=2)
def _ptb(root: Path) -> tuple[np.ndarray, np.ndarray, int]:
  train_words, valid_words = (_ptb_words(pin, root) for pin in files.PINS['ptb'])
  vocab = {w: i for i, w in enumerate(sorted(set(train_words)))}
  unk = vocab.get('<unk>', 0)
  train, valid = (
    np.array([vocab.get(w, unk) for w in words], np.int32) for words in (train_words, valid_words)
  )
  return train, valid, len(vocab)


@_register('ptb')
def load_ptb(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
  return _ptb(files.data_root(config))


@functools.lru_cache(maxsize=2)
def _ptb_chars(root: Path) -> tuple[np.ndarray, np.ndarray, int]:
  train, valid = (_code_points(files.read_pinned('ptb', pin, root)) for pin in files.PINS['ptb'])
  vocab = np.unique(train)  # the pinned ptb.valid uses no character that ptb.train lacks
  return _char_ids(train, vocab), _char_ids(valid, vocab), len(vocab)


@_register('ptb_chars')
def load_ptb_chars(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
  return _ptb_chars(files.data_root(config))


def _glob_bytes(key: str, patterns: str) -> np.ndarray:
  """The concatenated bytes of every file matched by the comma-separated glob patterns."""
  parts = [p.strip() for p in patterns.split(',') if p.strip()]
  if not parts:
    raise ValueError(f'dataset text_files: data.{key} is empty; give comma-separated glob patterns')
  data = []
  for pattern in parts:
    matched = sorted(
      p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not matched:
      raise FileNotFoundError(
        f'dataset text_files: data.{key} pattern {pattern!r} matches no file '
        f'(relative patterns start at {os.getcwd()})'
      )
    data += [Path(p).read_bytes() for p in matched]
  return np.frombuffer(b''.join(data), np.uint8)


@_register('text_files', BYTE_VOCAB)
def load_text_files(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
  return (
    _glob_bytes('train_files', config.data.train_files),
    _glob_bytes('eval_files', config.data.eval_files),
    BYTE_VOCAB,
  )


WIKITEXT_DIRS = ('wikitext-103-raw', 'wikitext-103', '.')
WIKITEXT_URL = 'https://huggingface.co/datasets/Salesforce/wikitext (wikitext-103-raw-v1)'


def _gpt2_encoder() -> tiktoken.Encoding:
  try:
    return tiktoken.get_encoding('gpt2')
  except Exception as e:  # tiktoken fetches its vocabulary over the network on first use
    raise FileNotFoundError(
      'dataset wikitext103: tiktoken could not load the GPT-2 BPE vocabulary '
      f'({type(e).__name__}: {e}). tiktoken downloads it on first use: run once with network, '
      'or set TIKTOKEN_CACHE_DIR to a folder holding the cached gpt2 files (vocab.bpe and '
      'encoder.json, stored under their sha1-hashed URL names)'
    ) from e


def _wikitext_file(root: Path, split: str) -> Path:
  candidates = [
    root / d / f'wiki.{split}.{ext}' for d in WIKITEXT_DIRS for ext in ('raw', 'tokens')
  ]
  for path in candidates:
    if path.is_file():
      return path
  raise FileNotFoundError(
    f'dataset wikitext103: no {split} file; looked for {", ".join(map(str, candidates))}; '
    f'get WikiText-103 from {WIKITEXT_URL} and unpack it under the data root (--config.data.dir, '
    f'else ${files.DATA_ENV}, else {files.cache_dir()})'
  )


def gpt2_tokens(path: Path, chunk_lines: int = 10_000) -> np.ndarray:
  """GPT-2 BPE tokens of a text file, cached as uint16 .npy keyed by the file's sha256.

  The text is encoded in chunks of whole lines (tiktoken's batch encoder runs them in threads), so
  no token spans a chunk boundary.
  """
  cached = files.cache_dir() / 'wikitext103' / f'{path.name}.{files.sha256_file(path)[:16]}.npy'

  def build(out: Path) -> None:
    encoder = _gpt2_encoder()
    lines = path.read_text(encoding='utf-8').splitlines(keepends=True)
    chunks = [''.join(lines[i : i + chunk_lines]) for i in range(0, len(lines), chunk_lines)]
    encoded = encoder.encode_ordinary_batch(chunks, num_threads=os.cpu_count() or 1)
    tokens = np.concatenate([np.asarray(chunk, np.uint16) for chunk in encoded])
    tmp = out.with_name(out.name + f'.{os.getpid()}.part')
    with open(tmp, 'wb') as f:
      np.save(f, tokens)
    os.replace(tmp, out)

  return files.load_cache(cached, lambda p: np.load(p, mmap_mode='r'), build)


@_register('wikitext103', GPT2_VOCAB)
def load_wikitext103(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
  root = files.data_root(config)
  return (
    gpt2_tokens(_wikitext_file(root, 'train')),
    gpt2_tokens(_wikitext_file(root, 'valid')),
    GPT2_VOCAB,
  )
