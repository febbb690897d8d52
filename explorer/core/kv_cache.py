"""The one place that builds a transformers key/value cache (its constructor changed across releases)."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def key_value_cache(config, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()):
    """A fresh cache for a model of ``config``, holding ``layers[i]`` = (keys, values) of layer i.

    A pass that extends a cache changes it in place, so every pass that reuses recorded columns gets a
    cache of its own built here.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache
