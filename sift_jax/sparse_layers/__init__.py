"""The sparse layer implementations that sift_jax.models and sift_jax.sift both build on.

`masked`: Flax Dense / Conv whose kernels are declared sparse and run as masked dense compute.
This package imports nothing else of sift_jax, so the model factory (sift_jax.models.layers) and
the Sparse-IFT members (sift_jax.sift) can both import it at module level without a circle.
"""

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
