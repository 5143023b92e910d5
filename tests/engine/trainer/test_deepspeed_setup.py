import pytest
import torch
from torch import nn

from engine.config import RunConfig, load_config
from engine.errors import UserError
from engine.trainer.deepspeed_setup import build_ds_config, build_optimizer, is_no_decay, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm1 = nn.LayerNorm(4)
        self.lora_a = nn.Parameter(torch.zeros(2, 4))
        self.lora_b = nn.Parameter(torch.zeros(4, 2))
        self.gamma = nn.Parameter(torch.ones(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_split_decay_and_skip_frozen():
    m = Tiny()
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    groups = {g["group"]: g for g in param_groups(named, no_decay_lora_b=True)}
    assert set(groups["decay"]["names"]) == {"fc.weight", "lora_a"}
    assert set(groups["no_decay"]["names"]) == {"fc.bias", "norm1.weight", "norm1.bias", "lora_b", "gamma"}
    assert groups["decay"]["wd_mult"] == 1.0 and groups["no_decay"]["wd_mult"] == 0.0
    with_b = {g["group"]: g for g in param_groups(named, no_decay_lora_b=False)}
    assert "lora_b" in with_b["decay"]["names"]
    with pytest.raises(ValueError, match="frozen"):
        param_groups(m.named_parameters())


def test_no_decay_rules():
    w = nn.Parameter(torch.zeros(3, 3))
    assert is_no_decay("blocks.0.norm1.weight", w, True)
    assert is_no_decay("blocks.0.attn.qkv.lora_b", w, True)
    assert not is_no_decay("blocks.0.attn.qkv.lora_b", w, False)
    assert not is_no_decay("blocks.0.attn.qkv.lora_a", w, True)
    assert is_no_decay("mask_token", nn.Parameter(torch.zeros(3)), True)
    tokens = nn.Parameter(torch.zeros(1, 5, 3))
    assert is_no_decay("vit.pos_embed", tokens, True) and is_no_decay("cls_token", tokens, True)
    assert not is_no_decay("vit.patch_embed.proj.weight", nn.Parameter(torch.zeros(4, 3, 2, 2)), True)


def test_optimizer_on_cpu_is_torch_adamw_without_frozen_state():
    m = Tiny()
    groups = param_groups([(n, p) for n, p in m.named_parameters() if p.requires_grad])
    opt, impl = build_optimizer(groups, RunConfig().optim, "cpu")
    assert isinstance(opt, torch.optim.AdamW) and "torch AdamW" in impl
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in in_opt for p in m.frozen.parameters())
    assert all("names" not in g for g in opt.param_groups)
    with pytest.raises(UserError, match="--optim.optimizer"):
        build_optimizer(groups, load_config(RunConfig, None, ["--optim.optimizer", "fused"]).optim, "cpu")


def test_ds_config_stages_precision_and_overrides():
    cfg = load_config(
        RunConfig,
        None,
        ["--data.batch_size", "4", "--train.grad_accum_steps", "3", "--zero.stage", "3", "--optim.clip_grad", "1.5"],
    )
    ds = build_ds_config(cfg, world_size=8, device_type="cuda", zero_overrides={"stage3_max_reuse_distance": 0})
    assert ds["train_batch_size"] == 4 * 3 * 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 1.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_max_reuse_distance"] == 0 and z["overlap_comm"] is True

    cast = load_config(RunConfig, None, ["--train.amp", "cast", "--zero.stage", "2", "--zero.offload_optimizer"])
    ds = build_ds_config(cast, 2, "cpu")
    assert ds["bf16"] == {"enabled": True} and "torch_autocast" not in ds
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["overlap_comm"] is False

    fp32 = load_config(RunConfig, None, ["--train.precision", "fp32"])
    ds = build_ds_config(fp32, 1, "cpu")
    assert not {"bf16", "fp16", "torch_autocast"} & set(ds) and ds["zero_optimization"] == {"stage": 0}
    with pytest.raises(UserError, match="--train.precision fp16"):
        build_ds_config(load_config(RunConfig, None, ["--train.precision", "fp16"]), 1, "cpu")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--zero.offload_param"], "--zero.offload_param"),
        (["--zero.offload_optimizer"], "--zero.offload_optimizer"),
        (["--train.keep_last", "0"], "--train.keep_last"),
        (["--optim.betas", "0.9,1.5"], "--optim.betas"),
        (["--train.resume", "/no/such/ckpt"], "--train.resume"),
    ],
)
def test_config_errors_name_the_field(argv, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        load_config(RunConfig, None, argv)
