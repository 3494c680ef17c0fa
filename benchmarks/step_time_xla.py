"""XLA:CPU compiler-option sets the step-time benchmarks compare (passed as compiler_options)."""

# name: XLA DebugOptions passed as compiler_options (the same fields XLA_FLAGS sets, minus '--';
# `XLA_FLAGS=--help python -c 'import jax; jax.devices()'` lists them). In jax 0.10.2 the YNN
# fusion list is empty by default, so 'ynn_off' compiles the same as 'default';
# --xla_cpu_use_thunk_runtime is deprecated (always on) and --xla_cpu_multi_thread_eigen is on.
VARIANTS = {
  'default': {},
  'ynn_off': {'xla_cpu_experimental_ynn_fusion_type': ''},
  'ynn_conv': {
    'xla_cpu_experimental_ynn_fusion_type': (
      'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
    )
  },
  'fast_math': {'xla_cpu_enable_fast_math': True},
  'onednn': {'xla_cpu_use_onednn': True},
  'no_xnnpack': {'xla_cpu_use_xnnpack': False},
  'xnn_graph': {'xla_cpu_experimental_xnn_graph_fusion_mode': 'XNN_GRAPH_FUSION_MODE_GREEDY'},
  'vector_512': {'xla_cpu_prefer_vector_width': 512},
}


def check_variants(names: list[str]) -> None:
  """Raises for a variant name that is not in VARIANTS, listing the known ones."""
  for name in names:
    if name not in VARIANTS:
      raise ValueError(f'unknown variant {name!r}; known: {", ".join(VARIANTS)}')
