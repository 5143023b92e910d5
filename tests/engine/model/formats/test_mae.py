"""MAE checkpoints (engine/model/formats/mae.py): the official layout and our MAE objective's keep
the decoder for the MAE objective; the encoder loads as timm's."""

import argparse

import torch

from engine.model.formats.mae import mae_decoder_state
from engine.model.vit import build_vit
from tests.engine.model.conftest import prenorm, tiny_cfg


def test_mae_layout_keeps_decoder(tiny_weights, tmp_path):
    images = torch.randn(2, 3, 64, 48)
    path, sd = tiny_weights(name="tiny_mae", img_size=64)
    dec = {
        "mask_token": torch.randn(1, 1, 32),
        "decoder_embed.weight": torch.randn(32, 64),
        "decoder_pos_embed": torch.zeros(1, 10, 32),
        "decoder_blocks.0.norm1.weight": torch.ones(32),
        "decoder_pred.weight": torch.randn(768, 32),
    }
    f = tmp_path / "mae_visualize_vit_tiny.pth"
    torch.save({"model": {**sd, **dec}, "args": argparse.Namespace(lr=1e-3), "epoch": 3}, f)
    vit = build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=str(f)))
    assert vit.base_info.format == "mae" and not hasattr(vit, "mask_token")
    state = mae_decoder_state(vit)
    assert set(state) == set(dec) and torch.equal(state["mask_token"], dec["mask_token"])
    assert torch.equal(
        prenorm(vit, images), prenorm(build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=path)), images)
    )
    assert mae_decoder_state(build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=path))) is None


def test_mae_objective_checkpoint_keeps_the_decoder_mask_token(tiny_weights, tmp_path):
    """Our MAE objective saves ``vit.*`` + ``decoder.*`` (official MAE names under ``decoder.``): the
    decoder's mask token comes back as ``mask_token`` beside the ``decoder_*`` tensors."""
    images = torch.randn(2, 3, 64, 48)
    path, sd = tiny_weights(name="tiny_mae", img_size=64)
    dec = {
        "mask_token": torch.randn(1, 1, 32),
        "decoder_embed.weight": torch.randn(32, 64),
        "decoder_pos_embed": torch.randn(1, 17, 32),
        "decoder_norm.weight": torch.ones(32),
    }
    module = {"vit." + k: v for k, v in sd.items()}
    module.update({"decoder." + k: v for k, v in dec.items()})
    f = tmp_path / "mae_run_consolidated.pth"
    torch.save({"module": module}, f)
    vit = build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=str(f)))
    assert vit.base_info.format == "mae" and not hasattr(vit, "mask_token")
    state = mae_decoder_state(vit)
    assert set(state) == set(dec)
    assert torch.equal(state["mask_token"], dec["mask_token"])
    assert torch.equal(
        prenorm(vit, images), prenorm(build_vit(tiny_cfg(name="tiny_mae", img_size=64, weights=path)), images)
    )
