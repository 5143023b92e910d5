"""An adapter trained from a random-init base (issue 15, item 10): the file cannot hold that base, so
rebuilding it must not silently use another one -- before the fix build_from_adapter built a fresh
random base and outputs differed by up to 4.2."""

import pytest
import torch

from engine.errors import UserError
from engine.model.explora import apply_explora
from engine.model.formats.adapter import load_adapter, read_adapter, save_adapter
from engine.model.tokens import forward_tokens
from engine.model.vit import build_from_adapter, build_vit
from tests.engine.model.conftest import perturb_trainable, tiny_cfg

SEED = 7


@pytest.fixture
def images():
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


def _out(vit, x):
    with torch.no_grad():
        return forward_tokens(vit.eval(), x)["prenorm"]


@pytest.fixture
def random_base_adapter(tmp_path):
    """(adapter file of a tiny model built under SEED without weights, that trained model)."""
    torch.manual_seed(SEED)
    vit = build_vit(tiny_cfg())
    apply_explora(vit, lora_rank=2, lora_targets=["q", "v"])
    perturb_trainable(vit)
    return save_adapter(vit, tmp_path / "adapter.safetensors", seed=SEED), vit


def test_build_from_adapter_refuses_to_invent_a_random_base(random_base_adapter):
    path, _ = random_base_adapter
    base = read_adapter(path)[1]["base"]
    assert base["weights"] == "" and base["seed"] == SEED and len(base["frozen_sha256"]) == 64
    with pytest.raises(UserError, match=rf"random-init base, which the file does not hold; pass seed={SEED}"):
        build_from_adapter(path)
    with pytest.raises(UserError, match=rf"random-init base \(seed {SEED}\) and this model's frozen weights are not"):
        build_from_adapter(path, seed=SEED + 1)


def test_the_right_seed_or_base_file_rebuilds_the_trained_model(random_base_adapter, tmp_path, images):
    from safetensors.torch import save_file

    path, trained = random_base_adapter
    ref = _out(trained, images)
    before = torch.get_rng_state()
    assert torch.equal(_out(build_from_adapter(path, seed=SEED), images), ref)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is left alone
    torch.manual_seed(SEED)
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in build_vit(tiny_cfg()).state_dict().items()}, str(base_file))
    assert torch.equal(_out(build_from_adapter(path, weights=str(base_file)), images), ref)


def test_loading_onto_another_random_base_is_refused_with_the_cli_hint(random_base_adapter):
    path, _ = random_base_adapter
    torch.manual_seed(SEED + 1)
    with pytest.raises(UserError, match="export/vit_merged.safetensors as --model.weights"):
        load_adapter(build_vit(tiny_cfg()), path)


def test_an_adapter_holding_every_tensor_needs_no_base(tmp_path, images):
    """Every tensor trained (the demo's from-scratch base): any base of the architecture fits."""
    torch.manual_seed(SEED)
    vit = build_vit(tiny_cfg())
    apply_explora(
        vit, unfreeze_blocks=[0, 1], lora_targets=[], train_patch_embed=True, train_pos_embed=True, train_tokens=True
    )
    perturb_trainable(vit)
    path = save_adapter(vit, tmp_path / "all.safetensors")
    assert torch.equal(_out(build_from_adapter(path), images), _out(vit, images))
