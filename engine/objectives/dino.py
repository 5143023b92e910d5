"""DINOv2 objective (DINO cls loss + iBOT masked-patch loss + KoLeo) with a shared-base EMA teacher.

One ``forward(batch, step)`` is one DINOv2 iteration on this rank's micro-batch:
1. teacher pass (EMA values swapped in, eval mode, no grad) on the unmasked global crops ->
   prototype scores of the cls tokens and of the patches the student will see masked;
2. targets: Sinkhorn-Knopp over the global batch (or the running center), at the scheduled
   teacher temperature;
3. student pass on the masked global crops and the local crops; one head call on
   [local cls, global cls, masked patches] (shared head) as DINOv2 does;
4. loss = w_dino * (dino_global + dino_local) + w_ibot * ibot + w_koleo * koleo, where koleo is
   summed over the global views (never across views of one image), as in DINOv2.
``on_step_end(step)`` moves the EMA after the optimizer step.
"""

from __future__ import annotations

import logging

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.config import DinoConfig
from engine.model.layer_decay import LayerDecay
from engine.model.tokens import forward_tokens
from engine.objectives.centering import AllReduce, identity_all_reduce
from engine.objectives.dino_clstoken_loss import DINOClsLoss
from engine.objectives.dino_head import LAST_LAYER, DINOHead
from engine.objectives.ibot_patch_loss import IBOTPatchLoss
from engine.objectives.koleo_loss import koleo_loss
from engine.objectives.monitor import CollapseMonitor
from engine.objectives.objective import Objective
from engine.objectives.schedules import momentum_schedule, teacher_temperature
from engine.objectives.teacher import ZERO3_REQUIREMENTS, EMATeacher

log = logging.getLogger(__name__)


class DinoObjective(Objective):
    """Student (ExPLoRA ViT + heads + mask token), EMA teacher state and the DINOv2 losses.

    vit: timm VisionTransformer (dynamic_img_size) with the recipe already applied (frozen base,
    LoRA, unfrozen blocks). total_steps: optimizer steps of the run (momentum schedule).
    n_global_crops: global crops per image in the batches. all_reduce: sum over ranks (identity
    without distribution). layer_decay: DINOv2's layer-wise lr decay and patch-embed lr factor
    (optim.layerwise_decay, optim.patch_embed_lr_mult), read by the trainer via :meth:`lr_multiplier`.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        cfg: DinoConfig,
        total_steps: int,
        n_global_crops: int = 2,
        all_reduce: AllReduce | None = None,
        layer_decay: LayerDecay = LayerDecay(),
    ):
        super().__init__()
        self.vit = vit
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.n_global = int(n_global_crops)
        self.all_reduce = all_reduce or identity_all_reduce
        self.layer_decay = layer_decay
        dim = vit.embed_dim
        head_kw = dict(
            out_dim=cfg.head_n_prototypes,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=cfg.head_bottleneck_dim,
            nlayers=cfg.head_nlayers,
        )
        self.dino_head = DINOHead(dim, **head_kw)
        self.ibot_head = DINOHead(dim, **head_kw) if cfg.ibot_separate_head else None
        # DINOv2 checkpoints carry a mask token in the backbone; use it when the model kept one
        vit_token = getattr(vit, "mask_token", None)
        if isinstance(vit_token, torch.Tensor):
            self.mask_token = None
        else:
            self.mask_token = nn.Parameter(torch.zeros(dim))
        self.dino_loss = DINOClsLoss(
            cfg.head_n_prototypes,
            student_temp=cfg.student_temp,
            centering=cfg.centering,
            center_momentum=cfg.center_momentum,
            sinkhorn_iterations=cfg.sinkhorn_iterations,
        )
        self.ibot_loss = IBOTPatchLoss(
            cfg.head_n_prototypes,
            student_temp=cfg.student_temp,
            centering=cfg.centering,
            center_momentum=cfg.center_momentum,
            sinkhorn_iterations=cfg.sinkhorn_iterations,
        )
        teacher_modules = {"vit": vit, "dino_head": self.dino_head}
        if self.ibot_head is not None:
            teacher_modules["ibot_head"] = self.ibot_head
        self.teacher = EMATeacher(teacher_modules)
        self.monitor = CollapseMonitor()
        heads = "DINO and iBOT heads" if self.ibot_head is not None else "DINO head (shared by iBOT)"
        log.info(
            "%s (%d prototypes) initialised from scratch: DINOv2 checkpoints carry no heads",
            heads,
            cfg.head_n_prototypes,
        )
        if self.mask_token is not None:
            log.info("iBOT mask token starts from zeros (the model has none)")

    # ------------------------------------------------------------------ interface
    def lr_multiplier(self, name: str) -> float:
        """Layer-wise lr factor of trainable ``name`` (DINOv2 param_groups: heads 1)."""
        return self.layer_decay.for_objective(name, len(self.vit.blocks))

    def frozen_steps(self, name: str) -> int:
        """First steps with lr 0 for ``name``: the heads' prototype layer (DINOv2's "last_layer",
        direction and gain) for ``freeze_last_layer_steps``, everything else 0."""
        head, _, leaf = name.partition(".")
        return self.cfg.freeze_last_layer_steps if head in ("dino_head", "ibot_head") and leaf in LAST_LAYER else 0

    def zero_config_overrides(self, stage: int) -> dict:
        """zero_optimization entries this objective needs at ZeRO ``stage`` (the shared-base teacher)."""
        return dict(ZERO3_REQUIREMENTS) if stage == 3 else {}

    def momentum(self, step: int) -> float:
        c = self.cfg
        return momentum_schedule(
            c.momentum_schedule, step, self.total_steps, c.momentum_teacher, c.final_momentum_teacher
        )

    def teacher_temp(self, step: int) -> float:
        c = self.cfg
        return teacher_temperature(step, c.warmup_teacher_temp_steps, c.warmup_teacher_temp, c.teacher_temp)

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        """After optimizer step ``step`` (0-based): EMA update with that step's momentum."""
        self.teacher.update(self.momentum(step))

    def get_extra_state(self) -> dict:
        """The EMA teacher goes into ``state_dict()`` under ``_extra_state`` (this rank's shards
        under ZeRO-3: see ``teacher.partitioned``)."""
        return {"teacher": self.teacher.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])

    # ------------------------------------------------------------------ forward
    def _ibot_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """batch: ``global_crops`` (n_g*B, C, H, W) crop-major, optional ``local_crops``
        (n_l*B, C, h, w) and ``masks`` (n_g*B, L) bool. Returns (scalar loss, float logs)."""
        c = self.cfg
        g = batch["global_crops"]
        if g.shape[0] % self.n_global:
            raise ValueError(f"global_crops has {g.shape[0]} rows, not a multiple of {self.n_global} crops")
        B = g.shape[0] // self.n_global
        local = batch.get("local_crops")
        n_l = 0 if local is None or local.shape[0] == 0 else local.shape[0] // B
        masks = batch.get("masks") if c.ibot_loss_weight > 0 else None
        do_ibot = masks is not None
        temp = self.teacher_temp(step)
        shared = self.ibot_head is None

        # 1. teacher
        with self.teacher.teacher_mode():
            t_tok = forward_tokens(self.vit, g)
            t_cls = t_tok["cls"]
            if do_ibot:
                t_patch = t_tok["patch"][masks]  # (M, D), image-major
                if shared:
                    t_out = self.dino_head(torch.cat([t_cls, t_patch]))
                    t_cls_logits, t_patch_logits = t_out[: t_cls.shape[0]], t_out[t_cls.shape[0] :]
                else:
                    t_cls_logits, t_patch_logits = self.dino_head(t_cls), self._ibot_head()(t_patch)
            else:
                t_cls_logits = self.dino_head(t_cls)
        # 2. targets (collectives: identical call order on every rank)
        t_cls_probs = self.dino_loss.teacher_targets(t_cls_logits, temp, self.all_reduce)
        if do_ibot:
            t_patch_probs = self.ibot_loss.teacher_targets(t_patch_logits, temp, self.all_reduce)

        # 3. student
        # mask_token None = the ViT's own (a DINOv2 checkpoint's), read inside the ViT's token assembly
        s_g = forward_tokens(self.vit, g, mask=masks, mask_token=self.mask_token)
        s_l = forward_tokens(self.vit, local) if local is not None and n_l else None
        head_in = ([s_l["cls"]] if s_l is not None else []) + [s_g["cls"]]
        if do_ibot:
            s_patch = s_g["patch"][masks]
            if shared:
                head_in.append(s_patch)
        sizes = [t.shape[0] for t in head_in]
        outs = list(self.dino_head(torch.cat(head_in)).split(sizes))
        s_l_logits = outs.pop(0) if n_l else None
        s_g_logits = outs.pop(0)
        if do_ibot:
            s_patch_logits = outs.pop(0) if shared else self._ibot_head()(s_patch)

        # 4. losses
        K = s_g_logits.shape[-1]
        dino_global, dino_local = self.dino_loss(
            s_g_logits.view(self.n_global, B, K),
            s_l_logits.view(n_l, B, K) if s_l_logits is not None else None,
            t_cls_probs.view(self.n_global, B, K),
        )
        loss = c.dino_loss_weight * (dino_global + dino_local)
        terms = {"dino_global": dino_global, "dino_local": dino_local}
        if do_ibot:
            ibot = self.ibot_loss(s_patch_logits, t_patch_probs, masks)
            loss = loss + c.ibot_loss_weight * ibot
            terms["ibot"] = ibot
        if c.koleo_loss_weight > 0:
            koleo = sum(koleo_loss(x) for x in s_g["cls"].chunk(self.n_global))
            loss = loss + c.koleo_loss_weight * koleo
            terms["koleo"] = koleo

        terms["loss"] = loss
        logs = dict(zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist()))
        logs["teacher_temp"] = temp
        logs["momentum"] = self.momentum(step)
        if do_ibot:
            logs["masked_patches"] = float(t_patch_probs.shape[0])
        logs.update(self.monitor(t_cls_probs, student_cls=s_g["cls"], teacher_cls=t_cls))
        return loss, logs
