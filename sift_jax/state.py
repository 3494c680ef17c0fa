"""The train state: one pytree with everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Everything that is checkpointed; every field is a pytree of arrays.

  `model_state` holds the model's non-parameter collections (BatchNorm's running
  statistics); `sparsity` holds the masks and the update rule's own state.
  """

  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  model_state: Any
  opt_state: Any
  sparsity: Any
  rng: jax.Array  # base key; each step folds in its step number
