"""Typed run configuration of extended pre-training: one dataclass section per subsystem.

``load_config(RunConfig, "tiny_cpu", ["--data.batch_size", "64"])`` (machinery in
:mod:`engine.config_io`, re-exported here) reads a YAML preset plus dotted CLI overrides into these
sections and validates them; errors name the dotted field. The fine-tuning and evaluation runs
reuse these sections (``engine/eval/config.py``). The training sections (optimizer, ZeRO, DeepSpeed
file, kernels, train) are defined in :mod:`engine.config_train` and re-exported here.

Sections are owned by the subsystems that read them; a new field needs a type, a default and a
docstring (the string literal under it) so that ``describe(RunConfig)`` can document it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from engine.config_io import check_field as _check
from engine.config_io import describe, from_dict, load_config, parse_overrides, save_config, to_dict
from engine.config_train import DeepSpeedFileConfig, KernelConfig, OptimConfig, TrainConfig, ZeroConfig
from engine.model_names import check_image_sizes

__all__ = [
    "DataConfig",
    "CropConfig",
    "ModelConfig",
    "ExploraConfig",
    "DinoConfig",
    "MAEConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ZeroConfig",
    "DeepSpeedFileConfig",
    "KernelConfig",
    "TrainConfig",
    "RunConfig",
    "TrainingRun",
    "LORA_TARGETS",
    "DEFAULT_LORA_TARGETS",
    "check_lora_targets",
    "describe",
    "from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]

# The linear layers of a timm ViT block LoRA can wrap: the q/k/v segments of the fused attn.qkv,
# attn.proj, mlp.fc1 and mlp.fc2.
LORA_TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")
# LoRA's own choice (Hu et al. 2021), and ExPLoRA's for the encoder and the MAE decoder.
DEFAULT_LORA_TARGETS = ("q", "v")


def check_lora_targets(targets: Sequence[str], field_name: str) -> None:
    """Every name in ``targets`` is one of :data:`LORA_TARGETS`; else a UserError naming ``--field_name``."""
    bad = sorted(set(targets) - set(LORA_TARGETS))
    _check(not bad, field_name, f"unknown target(s) {bad}; use any of {','.join(LORA_TARGETS)}")


@dataclass
class DataConfig:
    shards: str = ""
    """Shard spec: a directory holding manifest.json, a glob, a brace pattern or a list file."""
    batch_size: int = 32
    """Per-rank micro-batch size (images)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer per worker, in samples (0 disables sample shuffling); shuffle_buffer_bytes caps it too."""
    shuffle_buffer_bytes: int = 2 * 1024**3
    """Memory cap of one rank's shuffle buffers, all its workers together (bytes of raw samples); the start-up log gives
    the samples per worker it allows."""
    resampled: bool = True
    """Infinite resampled shard stream (training); False = exact epochs (evaluation)."""
    max_skip_rate: float = 0.05
    """Abort when more than this fraction of samples is corrupt/undecodable."""
    bands: list[int] | None = None
    """Band indices to keep from the shards (None = all)."""
    manifest: str = ""
    """manifest.json to use when the spec has none beside it (e.g. pipe:/https shards); '' = auto."""
    steps_per_epoch: int = 0
    """Resampled mode: batches per rank per epoch (0 = total_samples // (world_size * batch_size))."""
    shuffle_shards: bool = True
    """Exact mode: permute the shard order every epoch (same permutation on all ranks)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool | None = None
    """Pin host batches for async host->device copies (None = when CUDA is available)."""
    clip_percentiles: bool = False
    """Clamp each band to the manifest's p2/p98 before mean/std normalisation."""
    mean: list[float] | None = None
    """Per-band means (of the kept bands) overriding the manifest's stats."""
    std: list[float] | None = None
    """Per-band standard deviations (of the kept bands) overriding the manifest's stats."""
    classes: list[str] | None = None
    """Class names in index order for labelled data (None = the manifest's 'classes')."""
    eval_crop_pct: float = 0.875
    """Eval view: centre crop of this fraction of the short side, resized to the model's size."""
    augment_on: Literal["auto", "worker", "device"] = "auto"
    """Where photometric augmentation (colour jitter, grayscale, blur, solarize) runs: in the loader workers, or batched
    on the training device after the copy; auto = device when CUDA is available. Its random parameters are drawn in the
    workers either way."""

    def validate(self) -> None:
        _check(self.batch_size > 0, "data.batch_size", "must be > 0")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(0.0 <= self.max_skip_rate <= 1.0, "data.max_skip_rate", "must be in [0, 1]")
        _check(self.steps_per_epoch >= 0, "data.steps_per_epoch", "must be >= 0 (0 = derive from the manifest)")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 disables sample shuffling)")
        _check(
            self.shuffle_buffer_bytes > 0,
            "data.shuffle_buffer_bytes",
            "must be > 0 (use --data.shuffle_buffer 0 to disable sample shuffling)",
        )
        _check(0.0 < self.eval_crop_pct <= 1.0, "data.eval_crop_pct", "must be in (0, 1]")
        _check(
            self.bands is None or (len(self.bands) > 0 and min(self.bands) >= 0),
            "data.bands",
            "must be a non-empty list of band indices >= 0",
        )
        _check((self.mean is None) == (self.std is None), "data.mean", "give --data.mean and --data.std together")
        _check(
            self.mean is None or len(self.mean) == len(self.std or []),
            "data.std",
            "needs as many values as --data.mean",
        )
        _check(self.std is None or min(self.std) > 0, "data.std", "values must be > 0")


@dataclass
class CropConfig:
    global_size: int = 224
    """Global crop side (pixels); also the MAE view. A multiple of the patch size."""
    local_size: int = 98
    """Local crop side (pixels); a multiple of the patch size (DINOv2 vitl14.yaml and ExPLoRA's fMoW configs: 98 = 7 x
    14)."""
    num_global: int = 2
    """Number of global crops (DINOv2: 2)."""
    num_local: int = 8
    """Number of local crops (0 disables multi-crop)."""
    global_scale: tuple[float, float] = (0.32, 1.0)
    """Random-resized-crop area range of global crops."""
    local_scale: tuple[float, float] = (0.05, 0.32)
    """Random-resized-crop area range of local crops."""
    single_scale: tuple[float, float] = (0.2, 1.0)
    """Random-resized-crop area range of the single view (MAE pre-training, supervised fine-tuning)."""
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    """Random-resized-crop aspect-ratio range (width / height)."""
    dihedral: bool = True
    """Random flips and 90-degree rotations (overhead imagery has no canonical up)."""
    rgb_augment: bool = True
    """DINOv2 colour jitter, grayscale, blur and solarize on 3-band images, on values scaled to [0, 1] by 0-255 (uint8)
    or each band's manifest p2-p98 (other dtypes)."""
    spectral_jitter: Literal["none", "shared", "per_band"] = "none"
    """Non-RGB images: brightness/contrast jitter (0.4, p 0.8) on p2-p98-scaled values; 'shared' = one factor for all
    bands, contrast about each band's mean (SSL4EO-S12); 'per_band' = factors per band (changes spectral ratios); 'none'
    keeps spectral ratios (SatMAE)."""
    blur_all_bands: bool = False
    """Also apply DINOv2's Gaussian blur (per band, no band mixing) to non-RGB images."""
    consistent_group_masks: bool = False
    """Group-channel models: one iBOT spatial mask for all band groups (default: one per group)."""

    def validate(self) -> None:
        _check(self.global_size > 0 and self.local_size > 0, "crops.global_size", "sizes must be > 0")
        _check(self.num_global >= 1, "crops.num_global", "must be >= 1")
        _check(self.num_local >= 0, "crops.num_local", "must be >= 0")
        for name in ("global_scale", "local_scale", "single_scale"):
            lo, hi = getattr(self, name)
            _check(0 < lo <= hi <= 1, f"crops.{name}", "must satisfy 0 < lo <= hi <= 1")
        _check(0 < self.ratio[0] <= self.ratio[1], "crops.ratio", "must satisfy 0 < lo <= hi")


@dataclass
class ModelConfig:
    name: str = "vit_small_patch14_dinov2"
    """timm architecture: DINOv2 vit_{small,base,large,giant}_patch14[_reg4]_dinov2, MAE vit_{base,large}_patch16_224 /
    vit_huge_patch14_224 (a '.mae'-style tag is ignored), or 'tiny' / 'tiny_reg4' / 'tiny_mae' (dim 64, depth 2, 2
    heads; for tests and demos)."""
    weights: str = ""
    """Local pre-trained weight file (timm .safetensors/.pth, DINOv2 hub .pth, MAE .pth, geoexplora merged export or
    trainer checkpoint dir); '' = random init."""
    adapter: str = ""
    """ExPLoRA adapter file (geoexplora .safetensors) merged onto `weights` at build time; '' = none."""
    patch_embed_adapt: Literal["timm", "mean"] = "timm"
    """RGB -> in_chans patch-embed weights: 'timm' (cycle RGB kernels, scale 3/C) or 'mean' (every band gets the RGB
    mean, scaled 3/C)."""
    img_size: int = 224
    """Input side the position embedding is built for (interpolated for other sizes)."""
    in_chans: int = 3
    """Input bands."""
    patch_embed: Literal["plain", "group"] = "plain"
    """'plain' conv patch embed, or 'group' = SatMAE-style group-channel embedding."""
    band_groups: list[list[int]] | None = None
    """Band index groups for patch_embed=group (None = Sentinel-2 default after dropping B1,B9,B10)."""
    group_embed: Literal["learned", "sincos"] = "learned"
    """Band-group encoding of patch_embed=group: a learned (G, D) table, or SatMAE's fixed 1-D sin-cos of the group
    index in the last 256 channels (the MAE decoder's in its last 128)."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the blocks; only the student sees it (the EMA teacher runs in eval mode). DINOv2: 0.3
    default, 0.4 ViT-L; ExPLoRA's fMoW configs: 0.0."""
    drop_path_uniform: bool = True
    """Same drop-path rate in every block (DINOv2's drop_path_uniform); False = timm's linear ramp from 0."""
    grad_checkpointing: bool = False
    """Recompute each block in backward to save activation memory."""
    embed_dim: int | None = None
    """Override the architecture's width (tiny test models)."""
    depth: int | None = None
    """Override the number of blocks (tiny test models)."""
    num_heads: int | None = None
    """Override the number of heads (tiny test models)."""

    def validate(self) -> None:
        _check(self.img_size > 0, "model.img_size", "must be > 0")
        _check(self.in_chans > 0, "model.in_chans", "must be > 0")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
        if self.band_groups is not None:
            _check(
                all(len(g) > 0 for g in self.band_groups) and len(self.band_groups) > 0,
                "model.band_groups",
                "needs at least one non-empty group of band indices",
            )
            _check(
                all(0 <= b < self.in_chans for g in self.band_groups for b in g),
                "model.band_groups",
                f"band indices must lie in [0, model.in_chans={self.in_chans})",
            )

    def check_files(self) -> None:
        """The local files ``weights`` and ``adapter`` name exist. Not part of :meth:`validate`, so a
        config naming files the user does not have yet still parses (``--print-config``, ``--help``,
        sizing on the meta device); the launchers' input checks and ``build_vit`` run it before reading."""
        if self.weights:
            _check(
                Path(self.weights).exists(),
                "model.weights",
                f"file '{self.weights}' not found; give a local .safetensors/.pth file or '' for random init",
            )
        if self.adapter:
            _check(Path(self.adapter).is_file(), "model.adapter", f"file '{self.adapter}' not found")


@dataclass
class ExploraConfig:
    unfreeze_blocks: list[int] = field(default_factory=lambda: [-1])
    """Blocks trained fully (negative = from the end). They get no LoRA."""
    lora_rank: int = 64
    """LoRA rank r."""
    lora_alpha: float = 64.0
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Linear layers that get LoRA in frozen blocks: any of q, k, v, proj, fc1, fc2."""
    train_norms: bool = True
    """Train every LayerNorm (blocks' norm1/norm2 and the final norm)."""
    train_layerscale: bool = False
    """Train LayerScale gammas too."""
    train_patch_embed: bool = False
    """Unfreeze the patch embedding (always trained when it is newly initialised, e.g. group-channel)."""
    train_pos_embed: bool = False
    """Unfreeze the position embedding."""
    train_tokens: bool = True
    """Train the cls (and register) tokens, as ExPLoRA's launch scripts do (unfreeze_cls_token)."""
    train_mask_token: bool = True
    """Train the iBOT mask token a DINOv2 checkpoint carries (vit.mask_token; only the masked student pass uses it)."""

    def validate(self) -> None:
        _check(self.lora_rank > 0, "explora.lora_rank", "must be > 0")
        _check(
            len(set(self.unfreeze_blocks)) == len(self.unfreeze_blocks),
            "explora.unfreeze_blocks",
            f"lists a block twice: {self.unfreeze_blocks}",
        )
        _check(0.0 <= self.lora_dropout < 1.0, "explora.lora_dropout", "must be in [0, 1)")
        check_lora_targets(self.lora_targets, "explora.lora_targets")


@dataclass
class DinoConfig:
    head_n_prototypes: int = 65536
    """DINO head output dimension (prototypes)."""
    head_hidden_dim: int = 2048
    """DINO head MLP hidden width."""
    head_bottleneck_dim: int = 256
    """DINO head bottleneck width before the weight-normed prototypes."""
    ibot_separate_head: bool = False
    """Give iBOT its own head instead of sharing the DINO head."""
    dino_loss_weight: float = 1.0
    """Weight of the DINO (cls) loss."""
    ibot_loss_weight: float = 1.0
    """Weight of the iBOT masked-patch loss."""
    koleo_loss_weight: float = 0.1
    """Weight of the KoLeo regulariser on student cls features."""
    centering: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp"
    """Teacher centering: DINOv2's Sinkhorn-Knopp or DINO's running-mean center."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    teacher_temp: float = 0.07
    """Teacher softmax temperature after warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0."""
    warmup_teacher_temp_steps: int = 0
    """Steps of linear teacher-temperature warm-up."""
    momentum_teacher: float = 0.992
    """EMA momentum at step 0 (cosine schedule to final_momentum_teacher)."""
    final_momentum_teacher: float = 1.0
    """EMA momentum at the last step."""
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    """iBOT mask ratio range per masked global crop."""
    mask_probability: float = 0.5
    """Fraction of global crops that get an iBOT mask."""
    head_nlayers: int = 3
    """Linear layers of the head MLP up to the bottleneck (DINOv2: 3)."""
    center_momentum: float = 0.9
    """Momentum of the running-mean teacher center (centering='centering' only)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp normalisation rounds (centering='sinkhorn_knopp')."""
    momentum_schedule: Literal["cosine", "linear"] = "cosine"
    """Ramp of the EMA momentum from momentum_teacher to final_momentum_teacher over the run."""
    freeze_last_layer_steps: int = 0
    """First optimizer steps in which the heads' prototype layer (direction and gain) has lr 0, as DINOv2's
    last_layer_lr schedule (1 epoch = 1250 steps by default; ExPLoRA: 3 epochs)."""

    def validate(self) -> None:
        _check(self.head_n_prototypes > 0, "objective.dino.head_n_prototypes", "must be > 0")
        _check(
            0 <= self.momentum_teacher <= 1 and 0 <= self.final_momentum_teacher <= 1,
            "objective.dino.momentum_teacher",
            "momentums must be in [0, 1]",
        )
        _check(self.head_nlayers >= 1, "objective.dino.head_nlayers", "must be >= 1")
        _check(self.freeze_last_layer_steps >= 0, "objective.dino.freeze_last_layer_steps", "must be >= 0")
        _check(self.sinkhorn_iterations >= 1, "objective.dino.sinkhorn_iterations", "must be >= 1")
        _check(0 <= self.center_momentum < 1, "objective.dino.center_momentum", "must be in [0, 1)")
        _check(
            self.student_temp > 0 and self.teacher_temp > 0 and self.warmup_teacher_temp > 0,
            "objective.dino.teacher_temp",
            "temperatures must be > 0",
        )
        _check(
            min(self.dino_loss_weight, self.ibot_loss_weight, self.koleo_loss_weight) >= 0,
            "objective.dino.dino_loss_weight",
            "loss weights must be >= 0",
        )


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    """Fraction of patch tokens hidden from the encoder."""
    norm_pix_loss: bool = True
    """Normalise each target patch by its own mean/std (MAE's default for the released models)."""
    norm_pix_scope: Literal["group", "all_bands"] = "group"
    """Group-channel models: normalise each patch over its band group's values, or over all bands of the spatial patch
    (SatMAE's forward_loss)."""
    decoder_embed_dim: int = 512
    """Decoder width."""
    decoder_depth: int = 8
    """Decoder blocks."""
    decoder_num_heads: int = 16
    """Decoder heads."""
    decoder_lora_rank: int = 0
    """LoRA rank on q,v of the decoder blocks when the decoder comes from the weight file (ExPLoRA: 8); that decoder is
    then frozen except these adapters, its LayerNorms (with explora.train_norms) and layers the file lacks. 0 = the
    whole decoder trains; a decoder that starts from scratch always trains fully."""
    decoder_lora_alpha: float = 8.0
    """Decoder LoRA alpha; the update is scaled by alpha / decoder_lora_rank."""

    def validate(self) -> None:
        _check(0.0 < self.mask_ratio < 1.0, "objective.mae.mask_ratio", "must be in (0, 1)")
        _check(self.decoder_lora_rank >= 0, "objective.mae.decoder_lora_rank", "must be >= 0 (0 = train the decoder)")


@dataclass
class ObjectiveConfig:
    name: Literal["dino", "mae"] = "dino"
    """Self-supervised objective: 'dino' (DINOv2: DINO+iBOT+KoLeo) or 'mae'."""
    dino: DinoConfig = field(default_factory=DinoConfig)
    """DINOv2 objective settings."""
    mae: MAEConfig = field(default_factory=MAEConfig)
    """MAE objective settings."""


@dataclass
class RunConfig:
    """Everything one extended-pre-training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    explora: ExploraConfig = field(default_factory=ExploraConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    deepspeed: DeepSpeedFileConfig = field(default_factory=DeepSpeedFileConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Cross-section checks, before any model or data is built: every image size the run feeds
        the model is a multiple of its patch size."""
        sizes = [("crops.global_size", self.crops.global_size)]
        if self.objective.name == "dino" and self.crops.num_local > 0:
            sizes.append(("crops.local_size", self.crops.local_size))
        check_image_sizes(self.model.name, sizes + [("model.img_size", self.model.img_size)])


class TrainingRun(Protocol):
    """The sections a DeepSpeed training run reads (``engine.trainer``): ``RunConfig`` has them, and so
    does the fine-tuning run's ``FinetuneRunConfig``."""

    data: DataConfig
    optim: OptimConfig
    zero: ZeroConfig
    deepspeed: DeepSpeedFileConfig
    kernels: KernelConfig
    train: TrainConfig
