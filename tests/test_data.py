"""Tests of the data pipelines: determinism, resume, host sharding, eval padding, files, datasets."""

import gzip
import itertools
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sift_jax import config_lib
from sift_jax import data as data_lib
from sift_jax.data import augment, build_dataset, files, text
from sift_jax.data import images as images_lib

DATA_DIR = os.environ.get(files.DATA_ENV, '')


SMALL_STDLIB = 1_000_000


def make_config(name: str, **data):
  c = config_lib.base_config()
  c.data.name = name
  c.data.seq_len = 17
  c.data.max_bytes = SMALL_STDLIB
  c.batch_size = 12
  for k, v in data.items():
    c.data[k] = v
  return c


def assert_batches_equal(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def mock_tfds(num_examples: int = 23):
  return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize('name', ['digits', 'python_stdlib'])
def test_same_step_same_batch_and_steps_differ(name):
  d = build_dataset(make_config(name))
  assert_batches_equal(d.train_batch(3), build_dataset(make_config(name)).train_batch(3))
  first = next(iter(d.train_batch(3).values()))
  assert not np.array_equal(first, next(iter(d.train_batch(4).values())))
  c = make_config(name)
  c.seed = 1
  assert not np.array_equal(first, next(iter(build_dataset(c).train_batch(3).values())))


def test_resume_equals_continuing():
  d = build_dataset(make_config('python_stdlib'))
  continued = list(itertools.islice(d.train_iterator(0), 7))[4:]
  resumed = list(itertools.islice(build_dataset(make_config('python_stdlib')).train_iterator(4), 3))
  for a, b, step in zip(continued, resumed, range(4, 7), strict=True):
    assert_batches_equal(a, b)
    assert_batches_equal(a, d.train_batch(step))


def test_prefetch_reraises_errors():
  d = build_dataset(make_config('digits'))
  good = d.train_batch

  def failing(step):
    if step == 2:
      raise RuntimeError('boom at 2')
    return good(step)

  d.train_batch = failing
  it = d.train_iterator(0)
  next(it), next(it)
  with pytest.raises(RuntimeError, match='boom at 2'):
    next(it)


def sharded(name: str, config_fn=make_config):
  whole = build_dataset(config_fn(name))
  halves = [build_dataset(config_fn(name), process_index=p, process_count=2) for p in range(2)]
  return whole, halves


@pytest.mark.parametrize('name', ['digits', 'python_stdlib'])
def test_host_shards_concatenate_to_global_batch(name):
  whole, halves = sharded(name)
  for step in (0, 125):  # digits step 125 straddles an epoch boundary (1500 / 12 = 125)
    parts = [h.train_batch(step) for h in halves]
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert_batches_equal(joined, whole.train_batch(step))
    assert len(parts[0][next(iter(parts[0]))]) == 6
  for full, *parts in zip(whole.eval_batches(), *(h.eval_batches() for h in halves), strict=True):
    assert_batches_equal({k: np.concatenate([p[k] for p in parts]) for k in full}, full)


def test_image_epochs_are_permutations():
  d = build_dataset(make_config('digits'))
  seen = np.concatenate([d.train_indices(s) for s in range(125)])  # exactly one epoch
  np.testing.assert_array_equal(np.sort(seen), np.arange(1500))
  assert not np.array_equal(seen, np.arange(1500))
  second = np.concatenate([d.train_indices(s) for s in range(125, 250)])
  assert not np.array_equal(seen, second)


def test_batch_size_must_divide_by_process_count():
  c = make_config('digits')
  c.batch_size = 10
  with pytest.raises(ValueError, match='batch_size=10.*process count 3'):
    build_dataset(c, process_index=0, process_count=3)
  c.batch_size = 12
  c.eval.batch_size = 7
  with pytest.raises(ValueError, match='eval.batch_size=7'):
    build_dataset(c, process_count=2)
  with pytest.raises(ValueError, match='process_index=2'):
    build_dataset(make_config('digits'), process_index=2, process_count=2)


def test_image_eval_padding_weights_and_max_examples():
  from sklearn.datasets import load_digits

  c = make_config('digits')
  c.eval.batch_size = 128
  batches = list(build_dataset(c).eval_batches())
  assert len(batches) == 3  # 297 = 128 + 128 + 41
  assert [b['weights'].sum() for b in batches] == [128, 128, 41]
  last = batches[-1]
  assert last['image'].shape == (128, 8, 8, 1) and last['weights'].dtype == np.float32
  assert not last['image'][41:].any() and not last['label'][41:].any()
  labels = np.concatenate([b['label'][b['weights'] > 0] for b in batches])
  np.testing.assert_array_equal(labels, load_digits().target[1500:])
  c.eval.max_examples = 100
  capped = list(build_dataset(c).eval_batches())
  assert len(capped) == 1 and capped[0]['weights'].sum() == 100
  c.eval.batch_size = 0  # -> batch_size 12
  assert [b['image'].shape[0] for b in build_dataset(c).eval_batches()] == [12] * 9


def eval_labels(d) -> np.ndarray:
  return np.concatenate([b['label'][b['weights'] > 0] for b in d.eval_batches()])


def assert_histogram_close(subset: np.ndarray, split: np.ndarray, num_classes: int, tol: float):
  """Every class's share of the subset within `tol` of its share of the split."""
  p_sub = np.bincount(subset, minlength=num_classes) / len(subset)
  p_split = np.bincount(split, minlength=num_classes) / len(split)
  assert np.abs(p_sub - p_split).max() <= tol, (p_sub, p_split)


def test_eval_subset_of_a_class_sorted_split_is_stratified():
  """A split stored class by class (as cifar10_jpg's sorted paths): the first k would be one
  class; the subset holds each class at its share, exactly, for every seed and host count."""
  labels = np.repeat(np.arange(7), [31, 29, 37, 41, 43, 23, 47])  # sorted, odd prime sizes
  images = np.zeros((len(labels), 2, 2, 1), np.uint8)
  source = images_lib.ArraySource(images, labels)
  spec = images_lib.ImageSpec(7, (2, 2, 1), (0.0,), (1.0,))
  c = make_config('digits')
  c.eval.max_examples = 53
  c.eval.batch_size = 8
  d = images_lib.ImageDataset(c, source, source, spec)
  got = eval_labels(d)
  assert len(got) == 53 and len(np.unique(d.eval_indices())) == 53
  counts = np.bincount(got, minlength=7)
  assert np.abs(counts - 53 * np.bincount(labels) / len(labels)).max() < 1
  c.seed = 5
  np.testing.assert_array_equal(
    images_lib.ImageDataset(c, source, source, spec).eval_indices(), d.eval_indices()
  )
  hosts = [
    images_lib.ImageDataset(c, source, source, spec, process_index=p, process_count=2)
    for p in range(2)
  ]
  parts = [list(h.eval_batches()) for h in hosts]
  merged = np.concatenate(
    [
      np.concatenate([a['label'][a['weights'] > 0], b['label'][b['weights'] > 0]])
      for a, b in zip(*parts, strict=True)
    ]
  )
  np.testing.assert_array_equal(merged, got)


def test_eval_subset_of_a_tfds_split_is_a_seeded_uniform_sample():
  c = make_config('cifar10')
  c.eval.max_examples = 40
  with mock_tfds(200):
    d = build_dataset(c)
    idx = d.eval_indices()
    assert len(np.unique(idx)) == 40 and idx.max() >= 100  # spread, not the first 40
    c.seed = 3
    np.testing.assert_array_equal(build_dataset(c).eval_indices(), idx)
    split = d.eval_source.get(np.arange(200))[1]
    assert_histogram_close(eval_labels(d), split, 10, tol=0.12)


IMAGE_DATASETS = [
  pytest.param('digits', 100, id='digits'),
  pytest.param('fashion_mnist', 1000, id='fashion_mnist', marks=pytest.mark.real_data),
  pytest.param('cifar10_jpg', 1000, id='cifar10_jpg', marks=pytest.mark.real_data),
]


@pytest.mark.parametrize('name,k', IMAGE_DATASETS)
def test_eval_subset_label_histogram_matches_the_split(name, k):
  c = make_config(name)
  c.eval.max_examples = k
  c.eval.batch_size = 250  # digits' eval split has 297 examples: no larger batch is allowed
  d = build_dataset(c)
  split = d.eval_source.labels
  num_classes = d.meta['num_classes']
  assert_histogram_close(eval_labels(d), split, num_classes, tol=1.0 / k)


def test_text_eval_windows_are_consecutive():
  d = build_dataset(make_config('python_stdlib'))
  batches = list(itertools.islice(d.eval_batches(), 3))
  assert [b['weights'].sum() for b in batches] == [12, 12, 12]
  inputs = np.concatenate([b['inputs'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  T = 17
  expected = d.eval_tokens[: 36 * T + 1].astype(np.int32)
  np.testing.assert_array_equal(inputs.reshape(-1), expected[:-1])
  np.testing.assert_array_equal(targets.reshape(-1), expected[1:])
  n = (len(d.eval_tokens) - 1) // T
  assert sum(b['weights'].sum() for b in d.eval_batches()) == n


def test_text_eval_subset_spreads_over_the_split():
  c = make_config('python_stdlib')
  c.eval.max_examples = 30
  d = build_dataset(c)
  batches = list(d.eval_batches())
  assert [b['weights'].sum() for b in batches] == [12, 12, 6]
  assert not batches[-1]['inputs'][6:].any()
  n, T = (len(d.eval_tokens) - 1) // 17, 17
  starts = np.arange(30) * n // 30 * T  # evenly spaced windows, first to last part of the split
  inputs = np.concatenate([b['inputs'] for b in batches])[:30]
  np.testing.assert_array_equal(inputs, d.eval_tokens[starts[:, None] + np.arange(T)])
  assert starts[-1] > 0.9 * len(d.eval_tokens)
  np.testing.assert_array_equal(d.eval_indices(), np.arange(30) * n // 30)


def test_text_train_windows_shift_by_one():
  d = build_dataset(make_config('python_stdlib'))
  b = d.train_batch(0)
  assert b['inputs'].shape == b['targets'].shape == (12, 17)
  assert b['inputs'].dtype == b['targets'].dtype == np.int32
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  assert b['inputs'].max() < d.meta['vocab_size'] == 256
  train = d.train_tokens.tobytes()
  for row in b['inputs']:
    assert bytes(row.astype(np.uint8)) in train


def test_seq_len_defaults_to_model_context_length():
  c = make_config('python_stdlib', seq_len=0)
  c.model.context_length = 31
  assert build_dataset(c).meta == {'vocab_size': 256, 'seq_len': 31}
  del c.model['context_length']
  with pytest.raises(ValueError, match='seq_len'):
    build_dataset(c)


def test_python_stdlib_split_is_by_file_and_disjoint():
  stdlib = Path(sysconfig.get_paths()['stdlib'])
  skip = {'site-packages', 'dist-packages', '__pycache__'}
  paths = sorted(
    p.relative_to(stdlib).as_posix()
    for p in stdlib.rglob('*.py')
    if not skip & set(p.relative_to(stdlib).parts)
  )
  contents = []
  total = 0
  for rel in paths:
    if total >= SMALL_STDLIB:
      break
    contents.append((stdlib / rel).read_bytes()[: SMALL_STDLIB - total])
    total += len(contents[-1])
  d = build_dataset(make_config('python_stdlib'))
  assert d.num_train_examples + d.num_eval_examples == SMALL_STDLIB
  assert d.eval_tokens.tobytes() == b''.join(contents[::20])
  train = d.train_tokens.tobytes()
  assert train == b''.join(c for i, c in enumerate(contents) if i % 20)
  assert len(contents) > 40 and contents[0] not in train and contents[40] not in train


def test_text_files_globs(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b' / 'deep').mkdir(parents=True)
  (tmp_path / 'a' / 'y.txt').write_bytes(b'second file ' * 5)
  (tmp_path / 'a' / 'x.txt').write_bytes(b'first file ' * 5)
  (tmp_path / 'b' / 'deep' / 'z.txt').write_bytes(b'\xff\x00 deep ' * 5)
  (tmp_path / 'a' / 'skip.md').write_bytes(b'not matched')
  (tmp_path / 'eval.txt').write_bytes(bytes(range(40)))
  c = make_config(
    'text_files',
    train_files=f'{tmp_path}/a/*.txt, {tmp_path}/b/**/*.txt',
    eval_files=str(tmp_path / 'eval.txt'),
  )
  c.data.seq_len = 8
  c.eval.batch_size = 4  # the eval file holds 4 windows of 8 tokens
  d = build_dataset(c)
  assert (
    d.train_tokens.tobytes() == b'first file ' * 5 + b'second file ' * 5 + b'\xff\x00 deep ' * 5
  )
  np.testing.assert_array_equal(d.eval_tokens, np.arange(40))
  assert d.meta['vocab_size'] == 256 and d.train_batch(0)['inputs'].shape == (12, 8)
  c.data.eval_files = f'{tmp_path}/nothing/*.txt'
  with pytest.raises(FileNotFoundError, match='nothing/\\*.txt.*matches no file'):
    build_dataset(c)
  c.data.eval_files = ''
  with pytest.raises(ValueError, match='data.eval_files is empty'):
    build_dataset(c)


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits.*python_stdlib"):
    build_dataset(make_config('mnist'))


def test_missing_file_says_where_what_and_from_where(tmp_path):
  c = make_config('tiny_shakespeare', dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    build_dataset(c)
  msg = str(e.value)
  assert str(tmp_path / 'text/tinyshakespeare/input.txt') in msg
  assert files.PINS['tiny_shakespeare'][0].sha256 in msg
  assert 'raw.githubusercontent.com/karpathy/char-rnn' in msg
  c.data.name = 'cifar10_jpg'
  with pytest.raises(FileNotFoundError, match='cifar10_jpg_q75.tar.gz.*YoongiKim'):
    build_dataset(c)


def test_checksum_mismatch_names_file_and_sums(tmp_path):
  path = tmp_path / 'text' / 'tinyshakespeare' / 'input.txt'
  path.parent.mkdir(parents=True)
  path.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n')
  actual = files.sha256_file(path)
  with pytest.raises(ValueError) as e:
    build_dataset(make_config('tiny_shakespeare', dir=str(tmp_path)))
  msg = str(e.value)
  assert 'checksum mismatch' in msg and str(path) in msg
  assert files.PINS['tiny_shakespeare'][0].sha256 in msg and actual in msg
  gz = tmp_path / 'text' / 'ptb' / 'ptb.train.txt.gz'
  gz.parent.mkdir(parents=True)
  gz.write_bytes(gzip.compress(b' the cat sat \n'))
  with pytest.raises(ValueError, match='ptb.train.txt.gz.*decompressed'):
    build_dataset(make_config('ptb', dir=str(tmp_path)))


def write_ptb_gz(root: Path, damage) -> Path:
  gz = root / files.PINS['ptb'][0].relpath
  gz.parent.mkdir(parents=True, exist_ok=True)
  gz.write_bytes(damage(bytearray(gzip.compress(b' the cat sat on the mat \n' * 200))))
  return gz


def truncate(data: bytearray) -> bytearray:
  return data[: len(data) // 2]


def flip_a_bit(data: bytearray) -> bytearray:
  data[len(data) // 2] ^= 0x10
  return data


@pytest.mark.parametrize('damage', [truncate, flip_a_bit])
def test_damaged_gz_is_a_checksum_error_not_a_gzip_error(tmp_path, damage):
  gz = write_ptb_gz(tmp_path, damage)
  with pytest.raises(files.DataFileError) as e:
    build_dataset(make_config('ptb', dir=str(tmp_path)))
  msg = str(e.value)
  assert 'checksum mismatch' in msg and str(gz) in msg and files.PINS['ptb'][0].sha256 in msg
  assert 'delete and re-fetch it' in msg


def test_main_reports_a_damaged_gz_in_one_line(tmp_path):
  import subprocess
  import sys

  gz = tmp_path / files.PINS['fashion_mnist'][0].relpath
  gz.parent.mkdir(parents=True)
  gz.write_bytes(gzip.compress(b'\0' * 5000)[:100])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, '-m', 'sift_jax.main', '--config=configs/mlp_fashion_mnist.py:local']
    + [f'--config.data.dir={tmp_path}', f'--workdir={tmp_path / "run"}'],
    cwd=tmp_path,
    env={**os.environ, 'PYTHONPATH': repo},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert 'checksum mismatch' in out.stderr and str(gz) in out.stderr


@pytest.mark.parametrize('damage', [truncate, flip_a_bit])
def test_damaged_npz_cache_is_rebuilt_with_a_warning(tmp_path, damage, caplog):
  path = tmp_path / 'cache.npz'
  builds = []

  def build(out: Path) -> None:
    builds.append(out)
    np.savez(out, x=np.arange(5000), y=np.ones(3))

  def load(p: Path) -> dict:
    with np.load(p) as z:
      return {k: z[k] for k in z.files}

  first = files.load_cache(path, load, build)
  path.write_bytes(damage(bytearray(path.read_bytes())))
  again = files.load_cache(path, load, build)
  assert len(builds) == 2 and 'is damaged: sha256' in caplog.text and str(path) in caplog.text
  np.testing.assert_array_equal(again['x'], first['x'])
  assert len(files.load_cache(path, load, build)['x']) == 5000 and len(builds) == 2


def test_a_cache_without_its_checksum_is_rebuilt(tmp_path, caplog):
  path = tmp_path / 'cache.npy'
  np.save(path, np.arange(10))  # as written before caches carried their sha256
  builds = []

  def build(out: Path) -> None:
    builds.append(out)
    np.save(out, np.arange(10))

  files.load_cache(path, np.load, build)
  assert len(builds) == 1 and 'has no readable checksum file cache.npy.sha256' in caplog.text
  assert files.checksum_path(path).read_text().split()[0] == files.sha256_file(path)


def test_data_root_order(tmp_path, monkeypatch):
  c = make_config('digits')
  monkeypatch.setenv(files.DATA_ENV, str(tmp_path / 'env'))
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / 'cache'))
  assert files.data_root(c) == tmp_path / 'env'
  c.data.dir = str(tmp_path / 'cfg')
  assert files.data_root(c) == tmp_path / 'cfg'
  c.data.dir = ''
  monkeypatch.delenv(files.DATA_ENV)
  assert files.data_root(c) == tmp_path / 'cache'


class CharEncoder:
  """Stands in for tiktoken's GPT-2 encoder: one token per byte."""

  def encode_ordinary_batch(self, texts, num_threads=1):
    return [list(t.encode()) for t in texts]


def test_wikitext_tokenises_once_and_caches(tmp_path, monkeypatch):
  folder = tmp_path / 'data' / 'wikitext-103-raw'
  folder.mkdir(parents=True)
  train_text = ''.join(f' = Heading {i} = \n text line {i}\n' for i in range(50))
  (folder / 'wiki.train.raw').write_text(train_text)
  (folder / 'wiki.valid.raw').write_text(' = Valid = \n' * 20)
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setattr(text, '_gpt2_encoder', CharEncoder)
  c = make_config('wikitext103', dir=str(tmp_path / 'data'))
  d = build_dataset(c)
  assert d.meta['vocab_size'] == 50257
  np.testing.assert_array_equal(d.train_tokens, np.frombuffer(train_text.encode(), np.uint8))
  assert len(list((tmp_path / 'cache' / 'wikitext103').glob('*.npy'))) == 2

  def no_encoder():
    raise AssertionError('the cached tokens should have been used')

  monkeypatch.setattr(text, '_gpt2_encoder', no_encoder)
  np.testing.assert_array_equal(build_dataset(c).train_tokens, d.train_tokens)
  # A truncated token cache is rebuilt (said in a warning), not a numpy error.
  for npy in (tmp_path / 'cache' / 'wikitext103').glob('*.npy'):
    npy.write_bytes(npy.read_bytes()[:100])
  monkeypatch.setattr(text, '_gpt2_encoder', CharEncoder)
  rebuilt = build_dataset(c).train_tokens
  np.testing.assert_array_equal(rebuilt, np.frombuffer(train_text.encode(), np.uint8))
  with pytest.raises(FileNotFoundError, match='wiki.train.raw'):
    build_dataset(make_config('wikitext103', dir=str(tmp_path / 'elsewhere')))


def test_a_bit_flipped_in_the_wikitext_token_data_is_caught_and_rebuilt(
  tmp_path, monkeypatch, caplog
):
  folder = tmp_path / 'data' / 'wikitext-103-raw'
  folder.mkdir(parents=True)
  train_text = ' = Heading = \n some text of the article\n' * 40
  (folder / 'wiki.train.raw').write_text(train_text)
  (folder / 'wiki.valid.raw').write_text(' = Valid = \n' * 20)
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setattr(text, '_gpt2_encoder', CharEncoder)
  c = make_config('wikitext103', dir=str(tmp_path / 'data'))
  expected = np.frombuffer(train_text.encode(), np.uint8)
  np.testing.assert_array_equal(build_dataset(c).train_tokens, expected)
  (npy,) = (tmp_path / 'cache' / 'wikitext103').glob('wiki.train.raw.*.npy')
  data = bytearray(npy.read_bytes())
  data[-7] ^= 0x04  # a token in the array's data: numpy reads it without complaint
  npy.write_bytes(data)
  assert not np.array_equal(np.load(npy), expected)
  np.testing.assert_array_equal(build_dataset(c).train_tokens, expected)
  assert f'cache {npy} is damaged: sha256' in caplog.text and 'rebuilding it' in caplog.text


def test_wikitext_explains_missing_tiktoken_vocabulary(monkeypatch):
  import tiktoken

  def offline(name):
    raise ConnectionError('no network')

  monkeypatch.setattr(tiktoken, 'get_encoding', offline)
  with pytest.raises(FileNotFoundError, match='TIKTOKEN_CACHE_DIR'):
    text._gpt2_encoder()


def test_pad_crop_flip_is_a_shifted_window_and_a_mirror():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(5, 7, 9, 3), dtype=np.uint8)
  pad = 3
  offsets = np.array([[3, 3], [0, 0], [6, 6], [2, 5], [4, 1]])
  flips = np.array([False, False, False, True, True])
  out = augment.pad_crop_flip(images, offsets, flips, pad)
  np.testing.assert_array_equal(out[0], images[0])
  padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
  for i, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
    window = padded[i, dy : dy + 7, dx : dx + 9]
    np.testing.assert_array_equal(out[i], window[:, ::-1] if flip else window)
  assert not out[1, :3].any() and not out[1, :, :3].any()  # the top-left corner of the padding


def test_random_resized_crop_boxes_stay_inside_and_in_range():
  rng = np.random.default_rng(1)
  for _ in range(200):
    h, w = rng.integers(10, 400, size=2)
    top, left, ch, cw = augment.random_resized_crop_box(h, w, rng.random((10, 4)))
    assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w and ch > 0 and cw > 0
  # area 8000 * (0.08 + 0.5 * 0.92) = 4320 at ratio 1 -> 66 x 66, left at 0.999 of 80 - 66 + 1
  box = augment.random_resized_crop_box(100, 80, np.array([[0.5, 0.5, 0.0, 0.999]]))
  assert box == (0, 14, 66, 66)
  # no attempt fits a 10 x 100 image: the centred crop at the widest allowed ratio 4/3
  assert augment.random_resized_crop_box(10, 100, np.ones((10, 4))) == (0, 43, 10, 13)
  img = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
  assert augment.resize_center_crop(img, 256, 224).shape == (224, 224, 3)
  crop = augment.random_resized_crop_flip(img, rng.random((10, 4)), True, 24)
  assert crop.shape == (24, 24, 3) and crop.dtype == np.uint8


def test_dataset_augmentation_is_crop_flip_of_the_raw_images():
  with mock_tfds():
    whole, halves = sharded('cifar100')
    step = 2
    batch = whole.train_batch(step)
    assert batch['image'].shape == (12, 32, 32, 3) and batch['image'].dtype == np.float32
    assert whole.meta == {'num_classes': 100, 'image_shape': (32, 32, 3)}
    parts = [h.train_batch(step) for h in halves]
    assert_batches_equal({k: np.concatenate([p[k] for p in parts]) for k in batch}, batch)
    raw, labels = whole.train_source.get(whole.train_indices(step))
    np.testing.assert_array_equal(batch['label'], labels)
    pixels = (batch['image'] * np.array(whole.spec.std) + np.array(whole.spec.mean)) * 255
    pixels = np.round(pixels)
    padded = np.pad(np.stack(raw), [(0, 0), (4, 4), (4, 4), (0, 0)])
    moved = 0
    for i, img in enumerate(pixels):
      candidates = [
        (dy, dx, f)
        for dy in range(9)
        for dx in range(9)
        for f in (False, True)
        if np.array_equal(
          img,
          padded[i, dy : dy + 32, dx : dx + 32][:, ::-1]
          if f
          else padded[i, dy : dy + 32, dx : dx + 32],
        )
      ]
      assert candidates, f'row {i} is no padded window of its image'
      moved += (4, 4, False) not in candidates
    assert moved >= 6
    c = make_config('cifar100', augment=False)
    plain = build_dataset(c).train_batch(step)['image']
    expected = (np.stack(raw) / 255 - np.array(whole.spec.mean)) / np.array(whole.spec.std)
    np.testing.assert_allclose(plain, expected, atol=1e-5)


def test_imagenet_train_and_eval_through_tfds_mock():
  with mock_tfds(num_examples=11):
    c = make_config('imagenet2012')
    c.batch_size = 4
    d = build_dataset(c)
    assert d.meta == {'num_classes': 1000, 'image_shape': (224, 224, 3)}
    b = d.train_batch(0)
    assert b['image'].shape == (4, 224, 224, 3) and b['label'].shape == (4,)
    assert ((b['label'] >= 0) & (b['label'] < 1000)).all()
    assert_batches_equal(b, build_dataset(c).train_batch(0))
    evals = list(d.eval_batches())
    assert [e['weights'].sum() for e in evals] == [4, 4, 3]
    assert evals[-1]['image'].shape == (4, 224, 224, 3) and not evals[-1]['image'][3].any()


@pytest.mark.real_data
def test_real_tiny_shakespeare():
  d = build_dataset(make_config('tiny_shakespeare'))
  assert d.meta['vocab_size'] == 65
  assert (d.num_train_examples, d.num_eval_examples) == (1003854, 111540)
  assert d.train_batch(0)['inputs'].max() < 65
  text_bytes = (Path(DATA_DIR) / 'text/tinyshakespeare/input.txt').read_bytes()
  vocab = np.array(sorted(set(text_bytes)))
  assert bytes(vocab[d.train_tokens[:14]].astype(np.uint8)) == b'First Citizen:'


@pytest.mark.real_data
def test_real_ptb_and_uncompressed_copy(tmp_path):
  d = build_dataset(make_config('ptb'))
  assert d.meta['vocab_size'] == 10000
  assert (d.num_train_examples, d.num_eval_examples) == (929589, 73760)
  assert d.train_tokens.max() == 9999
  ptb = tmp_path / 'text' / 'ptb'
  ptb.mkdir(parents=True)
  for split in ('train', 'valid'):
    gz = Path(DATA_DIR) / f'text/ptb/ptb.{split}.txt.gz'
    (ptb / f'ptb.{split}.txt').write_bytes(gzip.decompress(gz.read_bytes()))
  copy = build_dataset(make_config('ptb', dir=str(tmp_path)))
  np.testing.assert_array_equal(copy.train_tokens, d.train_tokens)


@pytest.mark.real_data
def test_real_ptb_chars_decodes_to_the_files_text():
  d = build_dataset(make_config('ptb_chars'))
  assert d.meta['vocab_size'] == 50
  assert (d.num_train_examples, d.num_eval_examples) == (5101618, 399782)
  text = {
    s: gzip.decompress((Path(DATA_DIR) / f'text/ptb/ptb.{s}.txt.gz').read_bytes())
    for s in ('train', 'valid')
  }
  vocab = np.array(sorted(set(text['train'])), np.uint8)
  assert bytes(vocab[d.train_tokens]) == text['train']
  assert bytes(vocab[d.eval_tokens]) == text['valid']


@pytest.mark.real_data
def test_real_fashion_mnist_and_recompressed_gz(tmp_path):
  d = build_dataset(make_config('fashion_mnist'))
  assert d.meta == {'num_classes': 10, 'image_shape': (28, 28, 1)}
  assert (d.num_train_examples, d.num_eval_examples) == (60000, 10000)
  np.testing.assert_array_equal(np.bincount(d.train_source.labels), [6000] * 10)
  assert abs(float(d.train_batch(0)['image'].mean())) < 0.3  # normalised
  # Upstream .gz bytes differ from the Debian ones: any .gz with the pinned contents is accepted.
  folder = tmp_path / 'images' / 'fashion_mnist'
  folder.mkdir(parents=True)
  for pin in files.PINS['fashion_mnist']:
    src = Path(DATA_DIR) / pin.relpath
    if 'labels' in pin.relpath:
      (tmp_path / pin.relpath).write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), 1))
    else:
      shutil.copy(src, tmp_path / pin.relpath)
  assert files.sha256_file(tmp_path / files.PINS['fashion_mnist'][1].relpath) != (
    files.PINS['fashion_mnist'][1].sha256
  )
  copy = build_dataset(make_config('fashion_mnist', dir=str(tmp_path)))
  np.testing.assert_array_equal(copy.eval_source.labels, d.eval_source.labels)


@pytest.mark.real_data
def test_real_cifar10_jpg():
  d = build_dataset(make_config('cifar10_jpg'))
  assert d.meta == {'num_classes': 10, 'image_shape': (32, 32, 3)}
  assert d.num_train_examples + d.num_eval_examples == 60000
  assert (d.num_train_examples, d.num_eval_examples) == (50000, 10000)
  np.testing.assert_array_equal(np.bincount(d.train_source.labels), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(d.eval_source.labels), [1000] * 10)
  b = d.train_batch(0)
  assert b['image'].shape == (12, 32, 32, 3) and abs(float(b['image'].mean())) < 0.5


META_DATASETS = [
  pytest.param('digits', id='digits'),
  pytest.param('python_stdlib', id='python_stdlib'),
  pytest.param('fashion_mnist', id='fashion_mnist', marks=pytest.mark.real_data),
  pytest.param('cifar10_jpg', id='cifar10_jpg', marks=pytest.mark.real_data),
  pytest.param('tiny_shakespeare', id='tiny_shakespeare', marks=pytest.mark.real_data),
  pytest.param('ptb', id='ptb', marks=pytest.mark.real_data),
  pytest.param('ptb_chars', id='ptb_chars', marks=pytest.mark.real_data),
]


@pytest.mark.parametrize('name', META_DATASETS)
def test_dataset_meta_is_the_built_datasets_meta(name):
  c = make_config(name)
  assert data_lib.dataset_meta(c) == build_dataset(c).meta


def test_dataset_meta_needs_no_data_files(tmp_path):
  c = make_config('wikitext103', dir=str(tmp_path))
  c.model.context_length = 1024
  c.data.seq_len = 0
  assert data_lib.dataset_meta(c) == {'vocab_size': 50257, 'seq_len': 1024}
  c.data.name = 'cifar100'
  assert data_lib.dataset_meta(c) == {'num_classes': 100, 'image_shape': (32, 32, 3)}
  c.data.name = 'imagenet2012'
  assert data_lib.dataset_meta(c) == {'num_classes': 1000, 'image_shape': (224, 224, 3)}
  with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
    c.data.name = 'mnist'
    data_lib.dataset_meta(c)
