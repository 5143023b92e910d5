import pytest
import torch

from engine.config import ExploraConfig
from engine.errors import UserError
from engine.model.explora import apply_explora, param_report
from engine.model.lora import LoRALinear
from engine.model.tokens import forward_tokens
from engine.model.vit import build_vit
from tests.engine.model.conftest import tiny_cfg


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    return build_vit(tiny_cfg(depth=3, **kw)).eval()


@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v", "proj", "fc1", "fc2"]])
def test_output_at_init_equals_unadapted_model(targets, images):
    vit = _vit()
    with torch.no_grad():
        before = forward_tokens(vit, images)
    apply_explora(vit, unfreeze_blocks=[-1], lora_rank=4, lora_alpha=8, lora_targets=targets)
    with torch.no_grad():
        after = forward_tokens(vit, images)
    for k in ("cls", "patch", "prenorm"):
        assert torch.equal(before[k], after[k]), k


def _expected_trainable(depth, unfrozen, targets, norms=True):
    names = set()
    lora_t = [t for t in ("q", "k", "v") if t in targets]
    for i in range(depth):
        if i in unfrozen:
            continue
        if lora_t:
            names |= {f"blocks.{i}.attn.qkv.lora_a", f"blocks.{i}.attn.qkv.lora_b"}
        for t, mod in (("proj", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            if t in targets:
                names |= {f"blocks.{i}.{mod}.lora_a", f"blocks.{i}.{mod}.lora_b"}
        if norms:
            names |= {f"blocks.{i}.norm{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
    if norms:
        names |= {"norm.weight", "norm.bias"}
    return names | {"cls_token"}  # ExPLoRA's unfreeze_cls_token (explora.train_tokens, default on)


@pytest.mark.parametrize(
    "blocks, targets, norms",
    [
        ([-1], ["q", "v"], True),
        ([0, -1], ["q", "v"], True),
        ([-1], ["q", "k", "v", "proj", "fc1", "fc2"], True),
        ([], ["v", "fc1"], False),
    ],
)
def test_requires_grad_exactly_per_recipe(blocks, targets, norms):
    vit = _vit()
    apply_explora(
        vit, ExploraConfig(unfreeze_blocks=blocks, lora_rank=2, lora_alpha=2, lora_targets=targets, train_norms=norms)
    )
    depth = len(vit.blocks)
    unfrozen = {b % depth for b in blocks}
    block_params = {n for n, _ in vit.named_parameters() if any(n.startswith(f"blocks.{i}.") for i in unfrozen)}
    expect = _expected_trainable(depth, unfrozen, targets, norms) | block_params
    got = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert got == expect
    for i in unfrozen:
        assert not any(isinstance(m, LoRALinear) for m in vit.blocks[i].modules())


def test_optional_unfreeze_flags():
    vit = _vit(name="tiny_reg4")
    apply_explora(
        vit,
        unfreeze_blocks=[],
        lora_rank=2,
        lora_targets=["q"],
        train_layerscale=True,
        train_patch_embed=True,
        train_pos_embed=True,
        train_tokens=True,
    )
    got = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert {"pos_embed", "cls_token", "reg_token", "patch_embed.proj.weight", "blocks.0.ls1.gamma"} <= got
    report = param_report(vit)
    assert report.groups["tokens"].trainable == vit.cls_token.numel() + vit.reg_token.numel()
    assert report.groups["layerscale"].trainable == report.groups["layerscale"].total > 0


def test_report_groups_partition_all_parameters():
    vit = _vit()
    report = apply_explora(vit, unfreeze_blocks=[-1], lora_rank=4, lora_targets=["q", "v"])
    n_total = sum(p.numel() for p in vit.parameters())
    n_train = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    assert (report.total, report.trainable) == (n_total, n_train)
    d = report.as_dict()
    assert d["groups"]["unfrozen_blocks"]["total"] == sum(p.numel() for p in vit.blocks[-1].parameters())
    assert d["groups"]["lora"]["trainable"] == 2 * (2 * 4 * 64 + 2 * 64 * 4)
    assert "unfrozen_blocks" in report.table() and report.to_json().startswith("{")


def test_recipe_errors():
    vit = _vit()
    with pytest.raises(UserError, match="block 5 does not exist"):
        apply_explora(vit, unfreeze_blocks=[5])
    with pytest.raises(UserError, match="lora_targets"):
        apply_explora(_vit(), lora_targets=["qkv"])
    apply_explora(vit, lora_rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_explora(vit, lora_rank=2)
