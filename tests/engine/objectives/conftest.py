"""Tiny timm ViTs with an ExPLoRA-like freeze (last block + norms train), shared by the objective tests."""
import pytest
import timm


def make_vit(kind: str = "dino", img_size: int = 42, dim: int = 64, depth: int = 2, recipe: bool = True):
    """kind 'dino': DINOv2-style patch 14 (LayerScale 1.0 so features depend on the input);
    'mae': MAE-style patch 16 (cls token, no LayerScale)."""
    if kind == "dino":
        vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size,
                                dynamic_img_size=True, embed_dim=dim, depth=depth, num_heads=4, init_values=1.0)
    else:
        vit = timm.create_model("vit_base_patch16_224.mae", pretrained=False, img_size=img_size,
                                dynamic_img_size=True, embed_dim=dim, depth=depth, num_heads=4)
    if recipe:
        last = f"blocks.{depth - 1}."
        for n, p in vit.named_parameters():
            p.requires_grad = n.startswith(last) or ".norm" in n or n.startswith("norm.")
    return vit


@pytest.fixture
def tiny_vit():
    return make_vit
