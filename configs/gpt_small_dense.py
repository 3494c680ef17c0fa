"""GPT-3 Small on WikiText-103, dense (docs/methods.md section 5), and its `local` CPU variant.

Full run (GPU/TPU pod; WikiText-103 raw files and the GPT-2 BPE under the data root):
  python -m sift_jax.main --config=configs/gpt_small_dense.py --workdir=runs/gpt_dense
  21,511 steps of 512 x 1024 tokens; the papers report about 20.8 validation perplexity.

Local run (one CPU, embedded corpus, no download):
  python -m sift_jax.main --config=configs/gpt_small_dense.py:local
  About 3 minutes on 2 CPU cores; eval loss about 2.1 nats/byte (ln 256 = 5.55 at the start).

Arguments: `local` or `smoke` (local cut to 30 steps), `sift=`, `sparsity=`, `rule=`, `seed=`
(comma-separated), e.g.
  --config=configs/gpt_small_dense.py:local,sparsity=0.75,rule=rigl
"""

from sift_jax import config_lib
from sift_jax.models import gpt_preset, model_config


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.total_steps = 21_511
  c.batch_size = 512  # sequences of 1024 tokens: 0.5M tokens per step
  c.log_every_steps = 100
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 1_000

  c.model = model_config('gpt', **gpt_preset('gpt3_small'))
  c.model.dropout = 0.1
  c.model.dtype = 'bfloat16'  # accelerator compute; params and optimizer state stay float32

  c.data.name = 'wikitext103'
  c.eval.max_examples = 0

  c.optim.name = 'adamw'
  c.optim.lr = 6e-4
  c.optim.schedule = 'cosine'
  c.optim.warmup_fraction = 0.1  # 2,151 of 21,511 steps, as the paper's recipe
  c.optim.end_lr = 6e-5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.optim.decay_norm_and_bias = False  # GPT practice: no decay on LayerNorm and biases
  c.optim.clip_norm = 1.0

  c.sparsity.update_every_steps = 500  # the GPT runs' dT (docs/methods.md section 3)
  c.sparsity.end_fraction = 0.8

  if args['local']:
    # A byte-level GPT on the Python standard library's source that learns real structure
    # (eval loss well under 3 nats/byte) in a few CPU minutes.
    c.total_steps = 300
    c.batch_size = 16
    c.log_every_steps = 50
    c.eval_every_steps = 150
    c.checkpoint_every_steps = 100
    c.model.update(num_layers=4, d_model=128, num_heads=4, d_ff=512, context_length=128)
    c.model.dropout = 0.0  # too few steps to overfit
    c.model.dtype = 'float32'  # bfloat16 matmuls are slow on CPUs
    c.data.name = 'python_stdlib'
    c.eval.max_examples = 512
    c.optim.lr = 2e-3  # a small model trains stably at a higher rate
    c.optim.warmup_fraction = 1 / 3  # 100 of 300 steps
    c.optim.end_lr = 2e-4
    c.sparsity.update_every_steps = 100
  config_lib.apply_short_forms(c, args)
  return c
