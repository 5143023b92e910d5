"""Reading weight files (engine/model/weights.py) and fitting them to the model
(engine/model/state_fit.py): timm files, heads, the errors that name the file and the keys. The
other layouts are tested per format in tests/engine/model/formats/."""

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import UserError
from engine.model.vit import build_vit
from tests.engine.model.conftest import prenorm, tiny_cfg


def test_timm_safetensors_roundtrip_and_no_hub(tiny_weights, images, monkeypatch):
    import timm.models._builder as builder

    def no_hub(*a, **k):
        raise AssertionError("tried to fetch pretrained weights")

    monkeypatch.setattr(builder, "load_pretrained", no_hub)
    path, sd = tiny_weights(seed=3)
    torch.manual_seed(3)
    ref = build_vit(tiny_cfg())
    vit = build_vit(tiny_cfg(weights=path, name="tiny.lvd142m"))
    assert vit.base_info.format == "timm" and vit.base_info.weights_sha256()
    assert torch.equal(prenorm(vit, images), prenorm(ref, images))
    pth = path.replace(".safetensors", ".pth")
    torch.save({"state_dict": sd, "head.weight": torch.zeros(3)}, pth)
    assert torch.equal(prenorm(build_vit(tiny_cfg(weights=pth)), images), prenorm(ref, images))


def test_wrong_shapes_and_keys_name_the_file_and_keys(tiny_weights, tmp_path):
    path, sd = tiny_weights()
    with pytest.raises(UserError) as e:
        build_vit(tiny_cfg(weights=path, embed_dim=32))
    msg = str(e.value)
    assert path in msg and "mismatched" in msg and "blocks.0.attn.qkv.weight" in msg and "width 64" in msg
    bad = dict(sd)
    bad.pop("norm.weight")
    bad["extra.thing"] = torch.zeros(2)
    f = tmp_path / "bad.safetensors"
    save_file(bad, str(f))
    with pytest.raises(UserError) as e:
        build_vit(tiny_cfg(weights=str(f)))
    msg = str(e.value)
    assert str(f) in msg and "missing keys [norm.weight]" in msg and "unexpected keys [extra.thing]" in msg
    with pytest.raises(UserError, match="weights-only"):
        torch.save({"model": sd, "opt": _Opaque()}, tmp_path / "pickled.pth")
        build_vit(tiny_cfg(weights=str(tmp_path / "pickled.pth")))


class _Opaque:
    pass


def test_partitioned_tensors_are_refused_before_fitting(tiny_weights, tmp_path):
    """A state dict of a ZeRO-3 rank holds empty tensors: one error with the way out, before the
    position embedding or patch embed is looked at (an empty pos_embed cannot be resampled)."""
    _, sd = tiny_weights()
    f = tmp_path / "zero3_module_states.pth"
    torch.save({"module": {k: torch.empty(0) for k in sd}}, f)
    for cfg in (tiny_cfg(weights=str(f)), tiny_cfg(weights=str(f), img_size=28, in_chans=10, patch_embed="group")):
        with pytest.raises(UserError, match="empty \\(partitioned\\) tensors: a DeepSpeed ZeRO-3 checkpoint"):
            build_vit(cfg)
