"""sift_language on PTB, character level: sweep.py's grid and model on another corpus.

`ptb_chars` is the Penn Treebank text (Mikolov's language-model version) read as characters
(50 of them): a byte-level model like the tinyshakespeare one, on a corpus 5x larger (5.1M
training characters), with sweep.py's 4,000 steps of 1,024 tokens (0.8 epochs here). The dense
model is still learning there (-2.9 to -3.4% over the last fifth; README.md): the bar would need
about 32,000 steps, 40 CPU hours for the grid, while 4,000 fit one sitting of this 2-core machine
(4.2 CPU hours), so the run folders need not outlive it.
"""

import os

from sift_jax import sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def get_sweep():
  spec = sweep.load_sweep(os.path.join(HERE, 'sweep.py'))
  return {
    **spec,
    'fixed': {
      **spec['fixed'],
      'data.name': 'ptb_chars',
    },
    'runs_dir': 'runs/ptb_chars',
  }
