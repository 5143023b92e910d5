"""EMA teacher that shares the frozen base with the student (the ExPLoRA memory saving).

Under the ExPLoRA recipe most of the ViT is frozen, so student and EMA teacher have identical frozen
weights forever. A deep-copied teacher (DINO/DINOv2's way) would duplicate them; here the teacher is
the student's own modules, and we keep fp32 EMA copies only of the tensors that train (LoRA,
unfrozen blocks, norms, heads). The teacher forward temporarily writes the EMA values into those
tensors' storage under ``torch.no_grad()`` and restores the student values afterwards.

Why swapping storage and not ``torch.func.functional_call``: under DeepSpeed ZeRO-3 a parameter's
values live in its local shard ``p.ds_tensor`` and the module hooks all-gather that shard right
before each submodule runs. Writing the EMA shard into ``ds_tensor`` makes those hooks gather the
TEACHER weights, partitioned exactly like the student, with no DeepSpeed import. functional_call
replaces the Parameters by plain tensors that carry no ZeRO-3 metadata (the hooks fail on them or
skip them), and would need full, unpartitioned EMA copies gathered with DeepSpeed's API. Under ZeRO
0/1/2 (and without DeepSpeed) ``p.data`` holds the full current value, so the same swap applies to it.

ZeRO-3 correctness needs every trainable parameter to be released (``p.data`` empty) outside its
submodule's forward, so that no gathered copy survives across the swap: no prefetching, no reuse
across the teacher/student passes, no persistent small parameters. ``ZERO3_REQUIREMENTS`` lists the
DeepSpeed settings. The tensors that live on the ViT itself (cls/register/mask tokens, position
embedding) are read inside ``engine.model.tokens.TokenAssembly``'s forward, never from the
objective's, so DeepSpeed gathers and releases them around that call too (read from the
objective's forward they would stay gathered until it ends, across the swap). The swap checks the
condition before and after the teacher pass and raises instead of silently running the student
with teacher weights (or the reverse).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from engine.errors import UserError

# zero_optimization settings the shared-base teacher needs under ZeRO-3 (see module docstring)
ZERO3_REQUIREMENTS = {
    "stage3_prefetch_bucket_size": 0,
    "stage3_max_reuse_distance": 0,
    "stage3_param_persistence_threshold": 0,
}


def _home(p: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``p``'s values between forwards: its ZeRO-3 local shard, else p.data."""
    ds = getattr(p, "ds_tensor", None)
    return p.data if ds is None else ds.data


@contextlib.contextmanager
def eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run ``modules`` in eval mode (no drop-path / dropout, deterministic teacher), then restore
    every submodule's own flag."""
    modules = list(modules)
    flags = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.train(False)
    try:
        yield
    finally:
        for m, was in flags:
            m.training = was


class EMATeacher:
    """fp32 EMA of the trainable tensors of ``modules``; everything frozen is shared, not copied.

    modules: {prefix: module}; the tracked tensors are the parameters with ``requires_grad`` at
    the first use (after the recipe froze the rest and the trainer placed/partitioned the model), so
    the EMA starts equal to the student. Names are ``prefix.param_name``.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = dict(modules)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.ema: list[torch.Tensor] = []
        self._pending: dict | None = None
        self.initialized = False

    # ---------------------------------------------------------------- setup
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every distinct trainable tensor, in module order."""
        seen: set[int] = set()
        out = []
        for prefix, mod in self.modules.items():
            for n, p in mod.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{prefix}.{n}", p))
        return out

    def ensure_initialized(self) -> None:
        """Create the EMA from the current student values (or from a loaded state) once."""
        if self.initialized:
            return
        pairs = self.trainable()
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        self.ema = [_home(p).detach().float().clone() for p in self.params]
        self.initialized = True
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    @property
    def partitioned(self) -> bool:
        """True when the EMA holds ZeRO-3 shards: each rank must save its own teacher state."""
        return any(getattr(p, "ds_tensor", None) is not None for p in self.params)

    # ---------------------------------------------------------------- EMA
    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """ema <- momentum * ema + (1 - momentum) * student, for the trainable tensors only."""
        self.ensure_initialized()
        if momentum >= 1.0 or not self.ema:
            return
        w = 1.0 - momentum
        homes = [_home(p) for p in self.params]
        same = [(e, h) for e, h in zip(self.ema, homes) if h.dtype == torch.float32 and h.device == e.device]
        if same:
            torch._foreach_lerp_([e for e, _ in same], [h for _, h in same], w)
        for e, h in zip(self.ema, homes):
            if h.dtype != torch.float32 or h.device != e.device:
                e.lerp_(h.to(e.device, torch.float32), w)

    # ---------------------------------------------------------------- teacher forward
    def _check_swappable(self, when: str) -> None:
        # a merged LoRA layer computes with W + BA folded in: swapping A and B would change nothing
        for prefix, mod in self.modules.items():
            for n, m in mod.named_modules():
                if getattr(m, "merged", False) is True:
                    raise RuntimeError(
                        f"EMA teacher {when}: LoRA layer '{prefix}.{n}' is merged; unmerge adapters before training"
                    )
        for name, p in zip(self.names, self.params):
            ds = getattr(p, "ds_tensor", None)
            if ds is None:
                continue
            if p.data.numel() != 0:
                raise RuntimeError(
                    f"EMA teacher {when}: ZeRO-3 parameter '{name}' is gathered, so swapping its shard "
                    f"would not reach the values in use. Set zero_optimization {ZERO3_REQUIREMENTS} "
                    "(see engine/objectives/teacher.py)"
                )
            if ds.numel() == 0 or getattr(p, "ds_secondary_tensor", None) is not None:
                raise RuntimeError(
                    f"EMA teacher {when}: ZeRO-3 parameter '{name}' has no resident shard or a cached "
                    "secondary (hpZ) copy; NVMe parameter offload and hpZ are not supported with the "
                    "shared-base teacher"
                )

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the trainable tensors hold the EMA values; the student's come back after.

        The student values are backed up in their own dtype (a transient copy the size of the
        trainable set), so the restore is exact.
        """
        self.ensure_initialized()
        self._check_swappable("before the teacher pass")
        with torch.no_grad():
            homes = [_home(p) for p in self.params]
            backup = [h.clone() for h in homes]
            for h, e in zip(homes, self.ema):
                h.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for h, b in zip(homes, backup):
                    h.copy_(b)
        self._check_swappable("after the teacher pass")

    @contextlib.contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """no_grad + EMA values + eval mode: the block runs the teacher."""
        with torch.no_grad(), self.swapped(), eval_mode(self.modules.values()):
            yield

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """{'ema': {name: fp32 tensor}, 'partitioned': bool}. Partitioned = this rank's shards only."""
        self.ensure_initialized()
        return {"ema": dict(zip(self.names, self.ema)), "partitioned": self.partitioned}

    def load_state_dict(self, state: dict) -> None:
        """Restore the EMA; before the first use the values are kept and applied at initialisation."""
        if not self.initialized:
            self._pending = state
            return
        ema = state["ema"]
        missing = [n for n in self.names if n not in ema]
        extra = [n for n in ema if n not in set(self.names)]
        if missing or extra:
            raise UserError(
                f"--train.resume: the checkpoint's EMA teacher tracks other tensors than this model "
                f"trains (missing {missing[:3]}, unexpected {extra[:3]}); resume with the same "
                "explora/objective settings"
            )
        for n, e in zip(self.names, self.ema):
            src = ema[n]
            if src.shape != e.shape:
                raise UserError(
                    f"--train.resume: EMA tensor '{n}' has shape {tuple(src.shape)}, "
                    f"the model's is {tuple(e.shape)} (different model or ZeRO world size)"
                )
            e.copy_(src.to(e.device, e.dtype))

    # ---------------------------------------------------------------- memory
    def nbytes(self) -> int:
        """Bytes held by the EMA state on this rank."""
        self.ensure_initialized()
        return sum(e.numel() * e.element_size() for e in self.ema)


def teacher_memory(modules: Mapping[str, nn.Module], dtype: torch.dtype = torch.float32) -> dict:
    """Teacher state bytes: shared-base (trainable tensors only) vs a naive deep copy (all tensors).

    Counts parameter elements, so it works on meta-device models. Returns {'trainable_params',
    'total_params', 'shared_bytes', 'naive_bytes', 'saving'} with bytes in ``dtype`` (the EMA is fp32).
    """
    seen: set[int] = set()
    trainable = total = 0
    for mod in modules.values():
        for p in mod.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    size = torch.empty((), dtype=dtype).element_size()
    shared, naive = trainable * size, total * size
    return {
        "trainable_params": trainable,
        "total_params": total,
        "shared_bytes": shared,
        "naive_bytes": naive,
        "saving": 1.0 - shared / naive if naive else 0.0,
    }
