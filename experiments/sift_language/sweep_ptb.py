"""sift_language on PTB, character level: sweep.py's grid and model on another corpus.

`ptb_chars` is the Penn Treebank text (Mikolov's language-model version) read as characters
(50 of them): a byte-level model like the tinyshakespeare one, on a corpus 5x larger (5.1M
training characters), with the same 4,000 steps of 1,024 tokens (0.8 epochs). The dense model is
still learning there (-3.4% over the last fifth; pilots in README.md): the bar would need about
32,000 steps, 40 CPU hours for the grid, and this length is the one whose grid fits one sitting
of this 2-core machine (about 3.5 CPU hours), so the run folders need not outlive it.
"""

import os

from sift_jax import sweep

STEPS = 4_000  # misses the plateau bar, as 8,000 and 16,000 do (README.md)
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
