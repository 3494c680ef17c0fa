"""The sparse layer implementations that sift_jax.models and sift_jax.sift both build on.

`masked`: Flax Dense / Conv whose kernels are declared sparse and run as masked dense compute.
`block`: balanced block-sparse storage of a Dense kernel, its gather-matmul and the conversions
to and from masked state; `block_dense`: the block-sparse Dense layer; `pallas_kernel`: the
gather-matmul as a Pallas kernel (GPU / TPU); `block_model`: runs a model's masked Dense layers
block-sparse and converts its state between the two modes.
This package imports nothing else of sift_jax, so the model factory (sift_jax.models.layers) and
the Sparse-IFT members (sift_jax.sift) can both import it at module level without a circle.
"""

from sift_jax.sparse_layers.block import (
  check_balanced,
  check_dense_kernel,
  from_masked,
  gather_blocks,
  to_masked,
)
from sift_jax.sparse_layers.block_dense import BLOCK_COLLECTION, BlockSparseDense, block_matmul
from sift_jax.sparse_layers.block_model import block_execution, to_block_state, to_masked_state
from sift_jax.sparse_layers.masked import (
  SPARSE_COLLECTION,
  ConvNorm,
  Initializer,
  NormFactory,
  SparseConv,
  SparseDense,
  conv_unit,
  declare_sparse,
  dense_layer,
  sparse_kernel_paths,
)

__all__ = [
  'BLOCK_COLLECTION',
  'BlockSparseDense',
  'block_execution',
  'block_matmul',
  'check_balanced',
  'check_dense_kernel',
  'from_masked',
  'gather_blocks',
  'to_block_state',
  'to_masked',
  'to_masked_state',
  'SPARSE_COLLECTION',
  'ConvNorm',
  'Initializer',
  'NormFactory',
  'SparseConv',
  'SparseDense',
  'conv_unit',
  'declare_sparse',
  'dense_layer',
  'sparse_kernel_paths',
]
