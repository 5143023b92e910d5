"""A trained tiny model for the adapter and export tests."""

import pytest

from engine.model.explora import apply_explora
from engine.model.vit import build_vit
from tests.engine.model.conftest import perturb_trainable, tiny_cfg

RECIPE = dict(unfreeze_blocks=[-1], lora_rank=2, lora_alpha=4.0, lora_targets=["q", "v", "fc1"])


@pytest.fixture
def trained(tiny_weights):
    """(base weight path, a 3-block model with the recipe applied and its trainable tensors moved)."""
    path, _ = tiny_weights(depth=3)
    vit = build_vit(tiny_cfg(depth=3, weights=path))
    apply_explora(vit, **RECIPE)
    perturb_trainable(vit)
    return path, vit
