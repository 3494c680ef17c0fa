"""The one registry: models, datasets, optimizers, update rules, distributions, sift members.

Every name a config can hold is looked up here, so an unknown name fails in one
place with one kind of message that lists what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
  """A named table of constructors of one kind (for example 'model')."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
      if name in self._entries:
        raise ValueError(f'{self.kind} {name!r} is registered twice')
      self._entries[name] = fn
      return fn

    return add

  def get(self, name: str) -> Callable[..., Any]:
    if name not in self._entries:
      raise ValueError(f'unknown {self.kind} {name!r}; known: {", ".join(self.names())}')
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries


MODELS = Registry('model')
DATASETS = Registry('dataset')
OPTIMIZERS = Registry('optimizer')
RULES = Registry('sparsity rule')
DISTRIBUTIONS = Registry('sparsity distribution')
SIFT_MEMBERS = Registry('sift member')
# Filled by sift_jax.sparsity.execution (masked, block_sparse); here so rules need not import it.
EXECUTIONS = Registry('sparsity execution')
