"""sift_language on PTB, character level: sweep.py's grid, model and run length on another corpus.

`ptb_chars` is the Penn Treebank text (Mikolov's language-model version) read as characters
(50 of them): a byte-level model like the tinyshakespeare one, on a corpus 5x larger (5.1M
training characters), so 4,000 steps of 1,024 tokens see 0.8 epochs instead of 4.1. The run
length is checked by the dense pilot in README.md.
"""

import os

from sift_jax import sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def get_sweep():
  spec = sweep.load_sweep(os.path.join(HERE, 'sweep.py'))
  return {
    **spec,
    'fixed': {**spec['fixed'], 'data.name': 'ptb_chars'},
    'runs_dir': 'runs/ptb_chars',
  }
