"""The checkpoint wrapper alone: interrupted saves, keep-last-N with confirmation, shape checks."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax import checkpointing, errors


def state(scale: float = 1.0) -> dict:
  return {'params': {'w': jnp.full((3, 5), scale)}, 'step': jnp.int32(0)}


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_only_the_latest_interrupted_save_is_kept(tmp_path):
  ckpts = tmp_path / 'checkpoints'
  for step in (7, 9, 8):  # three kills mid-save, each found by the next run
    os.makedirs(ckpts / f'{step}.orbax-checkpoint-tmp-{step}00')
    (ckpts / f'{step}.orbax-checkpoint-tmp-{step}00' / 'chunk').write_text(str(step))
    checkpointing.Checkpointer(str(tmp_path), keep=2).close()
    assert os.listdir(tmp_path / 'checkpoints_incomplete') == [
      f'{step}.orbax-checkpoint-tmp-{step}00'
    ]
  # Two found at once: the newer step is kept.
  for step in (11, 10):
    os.makedirs(ckpts / f'{step}.orbax-checkpoint-tmp-0')
  checkpointing.Checkpointer(str(tmp_path), keep=2).close()
  assert os.listdir(tmp_path / 'checkpoints_incomplete') == ['11.orbax-checkpoint-tmp-0']
  assert not [p for p in os.listdir(ckpts) if 'tmp' in p]


def test_keep_last_n_spares_the_newest_confirmed_checkpoint(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(1, state())
  ckpt.confirm(1)
  for step in (2, 3):
    ckpt.save(step, state(float(step)))
  ckpt.wait()
  assert ckpt.steps() == [1, 3]  # 2 pruned; 1 kept while 3 is unconfirmed
  ckpt.confirm(3)
  ckpt.save(4, state())
  ckpt.wait()
  assert ckpt.steps() == [3, 4]
  moved = ckpt.set_aside_unconfirmed()
  assert ckpt.steps() == [3] and moved == [str(tmp_path / 'checkpoints_diverged' / '4')]
  restored, step = ckpt.restore_latest(abstract(state()))
  assert step == 3
  np.testing.assert_array_equal(restored['params']['w'], np.full((3, 5), 3.0))
  ckpt.close()


def test_shape_mismatch_names_the_array_and_moves_nothing(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, state())
  ckpt.wait()
  wrong = abstract({'params': {'w': jnp.zeros((3, 7))}, 'step': jnp.int32(0)})
  with pytest.raises(
    errors.UserError, match=r'params/w: checkpoint \(3, 5\) float32, model \(3, 7\)'
  ):
    ckpt.restore_latest(wrong)
  assert ckpt.steps() == [1]
  assert not os.path.exists(tmp_path / 'checkpoints_corrupt')
  ckpt.close()
