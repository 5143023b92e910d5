"""Model FLOPs of one training sample, from the architecture, for MFU.

Counted: every ``nn.Linear`` weight inside the transformer blocks (2 FLOPs per multiply-add per
token), the patch embedding, and the attention score/value products (2 * 2 * N^2 * D per block).
Not counted: LoRA branches (rank r << D), norms, softmax, the DINO heads and MAE decoder's
prediction layer. Backward = 2 x forward, the usual MFU convention (PaLM appendix B); frozen layers
skip their weight gradients, so the convention credits ExPLoRA with somewhat more work than the
hardware does -- compare MFU between runs of the same recipe, not across recipes.

Works on meta-device models (only shapes are read).
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.config import RunConfig


def _linear_weights(module: nn.Module) -> int:
    """Multiply-adds per token of all nn.Linear layers in ``module``."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def vit_forward_flops(vit: VisionTransformer, img_size: int, keep_ratio: float = 1.0) -> float:
    """Forward FLOPs of one ``img_size`` x ``img_size`` image through the ViT backbone.

    keep_ratio: fraction of patch tokens the blocks see (MAE encoder: 1 - mask_ratio).
    """
    p = int(vit.patch_embed.patch_size[0])
    groups = int(getattr(vit.patch_embed, "num_groups", 1))
    cells = (img_size // p) ** 2
    patches = int(cells * groups * keep_ratio)
    tokens = patches + int(getattr(vit, "num_prefix_tokens", 1))
    dim = int(vit.embed_dim)
    embed_in = sum(m.weight.numel() for m in vit.patch_embed.modules() if isinstance(m, nn.Conv2d))
    flops = 2.0 * cells * embed_in  # each conv weight element meets each spatial cell once
    for blk in vit.blocks:
        flops += 2.0 * tokens * _linear_weights(blk) + 4.0 * tokens * tokens * dim
    return flops


def mae_decoder_forward_flops(dim: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of MAE's decoder blocks over ``tokens`` tokens of width ``dim``."""
    per_token = 4 * dim * dim + 2 * int(dim * mlp_ratio) * dim
    return depth * (2.0 * tokens * per_token + 4.0 * tokens * tokens * dim)


def training_flops_per_sample(cfg: RunConfig, vit: VisionTransformer) -> float:
    """Model FLOPs of one image (all its crops) per optimizer step: student fwd+bwd (3x), plus the
    DINO teacher's forward on the global crops (1x), or MAE's encoder + decoder (3x)."""
    c = cfg.crops
    if cfg.objective.name == "dino":
        student = c.num_global * vit_forward_flops(vit, c.global_size) + c.num_local * vit_forward_flops(
            vit, c.local_size
        )
        teacher = c.num_global * vit_forward_flops(vit, c.global_size)
        return 3.0 * student + teacher
    m = cfg.objective.mae
    size = cfg.model.img_size
    enc = vit_forward_flops(vit, size, keep_ratio=1.0 - m.mask_ratio)
    groups = int(getattr(vit.patch_embed, "num_groups", 1))
    dec_tokens = (size // int(vit.patch_embed.patch_size[0])) ** 2 * groups + 1
    dec = mae_decoder_forward_flops(m.decoder_embed_dim, m.decoder_depth, dec_tokens)
    return 3.0 * (enc + dec)


def classifier_flops_per_sample(vit: VisionTransformer, img_size: int) -> float:
    """Model FLOPs of one fine-tuning image: backbone forward + backward (3x); the head is negligible."""
    return 3.0 * vit_forward_flops(vit, img_size)


# Dense 16-bit tensor-core peaks (TFLOPS, no sparsity) from the vendors' data sheets; matched as
# substrings of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS_16BIT = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("MI300X", 1307.0),
    ("MI250", 362.0),
)


def device_peak_flops(device_name: str, precision: str, override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device for ``precision``; 0 when unknown (then no MFU is reported).

    fp32 runs use TF32 tensor cores, half the 16-bit peak on A100/H100-class parts.
    """
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS_16BIT:
        if key.lower() in device_name.lower():
            return tflops * 1e12 * (0.5 if precision == "fp32" else 1.0)
    return 0.0
