import pytest
import timm
import torch

from engine.model.tokens import embed, forward_tokens
from tests.engine.model.conftest import plain_dinov2


@pytest.mark.parametrize(
    "name, kw",
    [
        ("vit_small_patch14_dinov2", dict(embed_dim=64, depth=2, num_heads=2)),
        ("vit_small_patch14_reg4_dinov2", dict(embed_dim=64, depth=2, num_heads=2)),
        ("vit_base_patch16_224.mae", dict(embed_dim=64, depth=2, num_heads=2)),
    ],
)
def test_matches_timm_forward_features(name, kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, img_size=112, dynamic_img_size=True, **kw).eval()
    P = m.num_prefix_tokens
    for side in (112, 224 if m.patch_embed.patch_size[0] == 16 else 98):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            ref = m.forward_features(x)
            out = forward_tokens(m, x)
        torch.testing.assert_close(out["cls"], ref[:, 0])
        torch.testing.assert_close(out["patch"], ref[:, P:])


def test_mask_and_visible_tokens():
    torch.manual_seed(0)
    m = plain_dinov2(embed_dim=32, depth=1).eval()
    x = torch.randn(2, 3, 56, 56)
    L = 16
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, :5] = True
    tok = torch.randn(32)
    t = embed(m, x, mask=mask, mask_token=tok)
    # masked positions hold mask_token + their position embedding, independent of the image
    t2 = embed(m, torch.randn_like(x), mask=mask, mask_token=tok)
    torch.testing.assert_close(t[:, 1:6], t2[:, 1:6])
    assert not torch.allclose(t[:, 6:], t2[:, 6:])
    ids = torch.tensor([[0, 3, 7], [15, 2, 1]])
    vis = embed(m, x, ids_keep=ids)
    full = embed(m, x)
    torch.testing.assert_close(vis[:, 1:], torch.gather(full[:, 1:], 1, ids[..., None].expand(-1, -1, 32)))
