"""The extension points of docs/library.md "Extending": a toy rule, model and Sparse-IFT member,
each registered by name and run through the real trainer."""

from __future__ import annotations

import json
import os
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sift_jax import config_lib, models, sift, sparsity, train
from sift_jax.models import layers
from sift_jax.registry import RULES, SIFT_MEMBERS
from sift_jax.sparsity import select

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@RULES.register('toy_shuffle')
class Shuffle(sparsity.Rule):
  """Every update draws each layer's mask afresh at random, with the plan's exact count."""

  def new_masks(self, sstate, params, g_fwd, step, key, aux):
    masks = [
      select.random_mask(jax.random.fold_in(key, layer.index), layer.shape, layer.active)
      for layer in self.layers
    ]
    return {'masks': self.as_tree(masks)}


class PairDense(nn.Module):
  """Two sparse Dense branches summed: at s = 0.5 the pair costs one dense layer."""

  sift_unit: ClassVar[bool] = True  # a transformed layer, for the FLOP reports
  features: int
  kernel_init: layers.Initializer
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a = layers.SparseDense(self.features, self.use_bias, self.dtype, kernel_init=self.kernel_init)
    b = layers.SparseDense(self.features, False, self.dtype, kernel_init=self.kernel_init)
    return a(x) + b(x)  # (..., features)


@SIFT_MEMBERS.register('toy_pair')
class PairMember(sift.Member):
  """Each transformed Dense layer becomes a PairDense."""

  def dense(self, features, *, name, kernel_init, use_bias=True, dtype=jnp.float32):
    return PairDense(features, kernel_init, use_bias, dtype, name=name)


class TwoLayer(nn.Module):
  config: dict
  width: int
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)  # (B, D)
    init = nn.initializers.lecun_normal()
    x = nn.relu(layers.make_dense(self.config, self.width, name='body', kernel_init=init)(x))
    return nn.Dense(self.num_classes, name='head')(x)  # (B, classes)


@models.register_model('toy_two_layer', {'width': 24})
def build_two_layer(config, meta):
  m = models.resolved(config)
  return TwoLayer(config, m['width'], meta['num_classes'])


def toy_config(**sparsity_keys):
  c = config_lib.load_config(os.path.join(REPO, 'configs/mlp_fashion_mnist.py'), 'local')
  c.update(total_steps=6, log_every_steps=2, eval_every_steps=6, checkpoint_every_steps=6)
  c.update(progress=False, batch_size=16)
  c.optim.update(schedule='constant', warmup_steps=0)
  c.eval.max_examples = 32
  c.data.name = 'digits'
  c.model = models.model_config('toy_two_layer')
  c.sparsity.update(level=0.5, update_every_steps=2, drop_schedule='constant', **sparsity_keys)
  return c


def test_toy_rule_model_and_member_train_through_the_trainer(tmp_path):
  c = toy_config(rule='toy_shuffle')
  c.sift.name = 'toy_pair'
  train.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [2, 4, 6]
  for r in rows:
    assert r['sparsity/density'] == pytest.approx(0.5)
    assert r['flops/train_per_example'] > 0  # the default accounting: 3 f_S
  assert rows[-1]['sparsity/churn'] > 0  # the toy rule ran its updates
  assert rows[-1]['sparsity/itop'] > 0.5
  with open(tmp_path / 'summary.json') as f:
    summary = json.load(f)
  # The member's two sparse branches in place of the model's transformed layer.
  assert set(summary['sparsity/layer_density']) == {
    'body/SparseDense_0/kernel',
    'body/SparseDense_1/kernel',
  }
  assert summary['sift/transformed_relative_to_dense'] == pytest.approx(1.0, abs=0.01)


def test_toy_model_config_and_unknown_names():
  group = models.model_config('toy_two_layer', width=8)
  assert (group.name, group.width) == ('toy_two_layer', 8)
  with pytest.raises(ValueError, match="unknown model 'tiny'; known: .*toy_two_layer"):
    models.model_config('tiny')
  c = toy_config(rule='static')
  c.model.depth = 3
  with pytest.raises(ValueError, match=r"unknown model key\(s\) \['depth'\]"):
    models.build_model(c, {'num_classes': 10, 'image_shape': (8, 8, 1)})
