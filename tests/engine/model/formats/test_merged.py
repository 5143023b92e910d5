"""The merged export (engine/model/formats/merged.py): a plain timm state dict, loadable by timm and
as --model.weights, equal to the adapter merged at build time."""

import torch
from safetensors.torch import load_file

from engine.model.formats.adapter import save_adapter
from engine.model.formats.merged import export_merged, merged_state_dict
from engine.model.vit import build_vit
from tests.engine.model.conftest import plain_dinov2, prenorm, tiny_cfg


def test_merged_state_dict_loads_into_plain_timm(trained, tmp_path, images):
    path, vit = trained
    sd = merged_state_dict(vit)
    plain = plain_dinov2(depth=3, num_classes=0)
    plain.load_state_dict(sd, strict=True)
    plain.eval()
    with torch.no_grad():
        ref = plain.forward_features(images)
    torch.testing.assert_close(ref, vit.norm(prenorm(vit, images)), atol=1e-5, rtol=1e-5)
    f = export_merged(vit, tmp_path / "merged.safetensors")
    assert set(load_file(str(f))) == set(sd)
    # the merged file is a base of its own, and --model.adapter merges at build time
    merged = build_vit(tiny_cfg(depth=3, weights=str(f)))
    torch.testing.assert_close(prenorm(merged, images), prenorm(vit, images), atol=1e-5, rtol=1e-5)
    a = save_adapter(vit, tmp_path / "adapter.safetensors")
    via_cfg = build_vit(tiny_cfg(depth=3, weights=path, adapter=str(a)))
    torch.testing.assert_close(prenorm(via_cfg, images), prenorm(vit, images), atol=1e-5, rtol=1e-5)
