"""sift_language on PTB, character level: sweep.py's grid and model on another corpus.

`ptb_chars` is the Penn Treebank text (Mikolov's language-model version) read as characters
(50 of them): a byte-level model like the tinyshakespeare one, on a corpus 5x larger (5.1M
training characters). Four times tinyshakespeare's steps, because the dense model is still
learning at 4,000 and 8,000 (pilots in README.md): 16,000 steps of 1,024 tokens, 3.2 epochs.
"""

import os

from sift_jax import sweep

STEPS = 16_000  # 4,000 and 8,000 steps miss the plateau bar (README.md)
HERE = os.path.dirname(os.path.abspath(__file__))


def get_sweep():
  spec = sweep.load_sweep(os.path.join(HERE, 'sweep.py'))
  return {
    **spec,
    'fixed': {
      **spec['fixed'],
      'data.name': 'ptb_chars',
      'total_steps': STEPS,
      'eval_every_steps': STEPS // 10,
    },
    'runs_dir': 'runs/ptb_chars',
  }
