"""sift_language on PTB (word-level, 10,000 words): sweep.py's grid and model on another corpus.

Not run yet (README.md): PTB's 10,000 x 64 embedding and output layer make each step about
2.5x a tinyshakespeare step, and its run length needs its own dense pilot (without dropout a
word-level model this size may overfit PTB's 930k training words).
"""

import os

from sift_jax import sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def get_sweep():
  spec = sweep.load_sweep(os.path.join(HERE, 'sweep.py'))
  return {**spec, 'fixed': {**spec['fixed'], 'data.name': 'ptb'}, 'runs_dir': 'runs/ptb'}
