"""The training loop: the Trainer owns the DeepSpeed engine, the step/accumulation loop, the
schedules, NaN/inf skipping, preemption, checkpoints/resume and metrics.

One optimizer step = ``train.grad_accum_steps`` micro-batches per rank. Per micro-batch, two
small all-reduces keep the ranks in agreement:

1. after fetching the batch, on a CPU (gloo) group, a max over ranks: "which stop signal
   (SIGTERM/SIGINT) reached a rank, if any?" and "did a fetch fail on a rank that was signalled?"
   (its DataLoader workers may have received the same signal). If so every rank abandons the step
   in flight before its forward and saves the state of the last completed step, including the data
   position and RNG states taken at that step boundary, so the resumed run is exactly the
   uninterrupted one; every rank then exits with the same code, 128 + that signal's number;
2. after the forward, on the device: ``[loss, non-finite?]`` -- the global mean loss for the logs,
   and every rank skips a micro-batch whose loss is NaN/inf on ANY rank before backward (nothing
   reaches the weights). The skipped micro-batch is replaced by the next one;
   ``train.max_bad_steps`` consecutive bad ones halt with :class:`NonFiniteLoss`.

Steps are 0-based; ``step`` in checkpoints and logs counts the optimizer steps done.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.atomic import atomic_write_text
from engine.config import TrainingRun, to_dict
from engine.errors import UserError
from engine.objectives.objective import Objective
from engine.progress import progress
from engine.trainer import deepspeed_setup
from engine.trainer.checkpoint import CheckpointManager, extra_state, load_extra_state, resolve_resume
from engine.trainer.flops import device_peak_flops
from engine.trainer.metrics import MetricsWriter, ThroughputMeter, format_metrics
from engine.trainer.preemption import PreemptionGuard, stop_exit_code
from engine.trainer.process_group import DistEnv
from engine.trainer.provenance import git_revision
from engine.trainer.rng import rng_state, seed_all, set_rng_state
from engine.trainer.schedules import OptimSchedule

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss was NaN/inf on some rank for ``train.max_bad_steps`` consecutive micro-batches."""


@dataclass
class FitResult:
    step: int
    """Optimizer steps done when fit() returned."""
    preempted: str | None = None
    """Name of the signal that stopped the run early (SIGTERM/SIGINT; the same on every rank, even one
    that was not signalled itself); a checkpoint of the last completed step was saved."""
    checkpoint: Path | None = None
    """The last checkpoint written or resumed from."""
    last: dict = field(default_factory=dict)
    """The last metrics record."""
    evals: list = field(default_factory=list)
    """Records of the ``evaluate`` callback, with their step (fine-tuning's validations)."""

    @property
    def exit_code(self) -> int:
        """0 when the run finished, 128 + signal number when it was stopped (143 for SIGTERM)."""
        return stop_exit_code(self.preempted)


def _all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op, group=group)
    return t


class Trainer:
    """Runs ``objective`` on ``loader`` under DeepSpeed for ``cfg.train.max_steps`` optimizer steps.

    objective: ``forward(batch, step) -> (loss, logs)``, ``trainable_parameters()``, ``on_step_end(step)``,
    ``zero_config_overrides(stage)`` (and optionally ``lr_multiplier(name)`` for layer-wise lr decay).
    loader: iterable of host batches with ``state_dict()``/``load_state_dict()`` (its position). prepare: host batch
    -> device batch (dtype conversion + normalisation on ``env.device``). flops_per_image: model
    FLOPs per training image for MFU (0 = none). evaluate: called on every rank with the step
    count and the engine's module (the objective, possibly ZeRO-3 partitioned) every ``eval_every``
    optimizer steps and after the last one, in eval mode under no_grad; its
    record goes to the metrics as ``val/...`` (fine-tuning's validation and best-checkpoint keeping).
    """

    def __init__(
        self,
        cfg: TrainingRun,
        objective: Objective,
        loader: Iterable,
        env: DistEnv,
        *,
        prepare: Callable[[dict], dict] = lambda b: b,
        flops_per_image: float = 0.0,
        evaluate: Callable[[int, Any], dict] | None = None,
        eval_every: int = 0,
    ):
        self.cfg, self.objective, self.loader, self.env = cfg, objective, loader, env
        self.prepare, self.flops_per_image = prepare, flops_per_image
        self.evaluate, self.eval_every = evaluate, int(eval_every)
        self.output_dir = Path(cfg.train.output_dir)
        self.global_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * env.world_size
        self.engine: Any = None  # deepspeed.DeepSpeedEngine (untyped), built by setup()
        self.report: deepspeed_setup.OptimizerReport | None = None
        self.resumed_from: Path | None = None
        self.ckpt = CheckpointManager(self.output_dir, env.rank, env.world_size, cfg.train.keep_last)
        self.metrics = MetricsWriter(
            self.output_dir, enabled=env.is_main, loggers=cfg.train.logger, config=to_dict(cfg) if env.is_main else None
        )
        self._git = git_revision() if env.is_main else ""
        self._flags: dist.ProcessGroup | None = None  # group of the stop-flag all-reduce (None = the default)
        self._it: Iterator = iter(())
        self._bad, self._loss_sum, self._loss_n = 0, 0.0, 0

    # ------------------------------------------------------------------ setup / checkpoints
    def setup(self) -> int:
        """Build the engine and restore the checkpoint ``train.resume`` names; returns the start step."""
        cfg, env = self.cfg, self.env
        self.engine, self.report = deepspeed_setup.initialize(self.objective, cfg, env.world_size, env.device.type)
        self.engine.train()
        if dist.is_initialized() and dist.get_backend() != "gloo":
            # host-side flags must not wait on the device queue (NCCL would need a CUDA tensor + sync)
            flags = dist.new_group(backend="gloo")
            assert isinstance(flags, dist.ProcessGroup)  # every rank is a member of this group
            self._flags = self.ckpt.group = flags
        if env.is_main:
            atomic_write_text(self.output_dir / "optimizer.json", json.dumps(self.report.to_dict(), indent=1))
            atomic_write_text(self.output_dir / "deepspeed_config.json", json.dumps(self.report.ds_config, indent=1))
        seed_all(cfg.train.seed + 1000 * env.rank)
        self.ckpt.remove_temp()
        found = [str(p) if (p := resolve_resume(cfg.train.resume, self.output_dir)) else None]
        if dist.is_initialized():
            dist.broadcast_object_list(found, src=0)
        self.resumed_from = Path(found[0]) if found[0] else None
        if self.resumed_from is None:
            return 0
        meta, state = self.ckpt.load(self.engine, self.resumed_from)
        step = int(meta["step"])
        if state is not None:
            set_rng_state(state["rng"])
            if state.get("data") is not None and hasattr(self.loader, "load_state_dict"):
                self.loader.load_state_dict(state["data"])
            load_extra_state(self.objective, state.get("extra", {}))
        log.info("resumed from %s at step %d", self.resumed_from, step)
        self.metrics.event("resume", step, checkpoint=str(self.resumed_from))
        return step

    def _boundary(self) -> dict:
        """Data position and RNG states now, at a step boundary (what a checkpoint of it holds)."""
        return {"rng": rng_state(), "data": self.loader.state_dict() if hasattr(self.loader, "state_dict") else None}

    def save(self, step: int, boundary: dict | None = None) -> Path:
        """Checkpoint after ``step`` optimizer steps (all ranks call it). boundary: the data position
        and RNG states of that step boundary when the loop has moved past it (abandoned step)."""
        rank_state = dict(boundary or self._boundary(), extra=extra_state(self.objective))
        meta = {
            "config": to_dict(self.cfg),
            "git": self._git,
            "global_batch": self.global_batch,
            "samples_seen": step * self.global_batch,
            "zero_stage": self.cfg.zero.stage,
            "data_rank0": rank_state["data"],
        }
        return self.ckpt.save(self.engine, step, rank_state, meta)

    # ------------------------------------------------------------------ data
    def _fetch(self, guard: PreemptionGuard) -> tuple[dict | None, bool]:
        """(next host batch, False), or (None, True) when the fetch failed after a stop request
        (the same signal killed this rank's DataLoader workers); any other failure propagates."""
        try:
            try:
                return next(self._it), False
            except StopIteration:  # an epoch of a finite loader ended: start the next one
                self._it = iter(self.loader)
                try:
                    return next(self._it), False
                except StopIteration:
                    raise UserError(
                        "--data.shards: the data stream produced no batch in a whole epoch; "
                        "check the shards and --data.batch_size"
                    ) from None
        except (RuntimeError, OSError, EOFError):
            if not guard.requested:
                raise
            log.warning("data loader failed after the stop request (its workers were signalled too)")
            return None, True

    def _close_data(self) -> None:
        """Finish the data iterator and shut the loader's DataLoader workers down now (a training
        loader keeps them across epochs until it is closed)."""
        for obj in (self._it, self.loader):
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self._it = iter(())

    def _device_batch(self, batch: dict) -> dict:
        """prepare() plus, when the model itself is stored in 16 bits (fp16, bf16 'cast'), the cast of
        floating inputs to that dtype (autocast and fp32 runs feed fp32)."""
        batch = self.prepare(batch)
        t = self.cfg.train
        dtype = (
            torch.float16
            if t.precision == "fp16"
            else (torch.bfloat16 if t.precision == "bf16" and t.amp == "cast" else None)
        )
        if dtype is None:
            return batch
        return {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()
        }

    # ------------------------------------------------------------------ loop
    def fit(self) -> FitResult:
        cfg, env, t = self.cfg, self.env, self.cfg.train
        step = start = self.setup()
        sched = OptimSchedule.from_config(cfg.optim, self.global_batch, t.max_steps)
        peak = device_peak_flops(
            torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu", t.precision, t.peak_tflops
        )
        meter = ThroughputMeter(self.global_batch, env.world_size, env.device, self.flops_per_image, peak)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        result = FitResult(step=step, checkpoint=self.resumed_from)
        last_saved = step if self.resumed_from is not None else None
        self._it = iter(self.loader)
        with (
            PreemptionGuard() as guard,
            progress(
                total=t.max_steps, initial=start, desc="train", unit="step", every=t.log_every, disable=not env.is_main
            ) as bar,
        ):
            # logged once the guard is installed: from this line on, SIGTERM/SIGINT mean "checkpoint and stop"
            log.info(
                "training steps %d -> %d: global batch %d (%d/rank x %d accumulation x %d ranks), peak lr %.3g",
                step,
                t.max_steps,
                self.global_batch,
                cfg.data.batch_size,
                t.grad_accum_steps,
                env.world_size,
                sched.peak_lr,
            )
            while step < t.max_steps:
                boundary = self._boundary()
                lr, wd = sched.apply(self.engine.optimizer.param_groups, step)
                stop, logs = self._optimizer_step(step, guard, meter, result.checkpoint)
                if stop:  # the step in flight is abandoned; the checkpoint holds its start
                    if last_saved != step:
                        result.checkpoint, last_saved = self.save(step, boundary), step
                    result.preempted = signal.Signals(stop).name
                    if env.is_main:
                        log.warning(
                            "stopped at step %d after %s; resume with --train.resume auto", step, result.preempted
                        )
                    self.metrics.event("preempted", step, signal=result.preempted)
                    break
                self.objective.on_step_end(step)
                step += 1
                meter.step_done()
                if step % t.log_every == 0 or step == t.max_steps:
                    result.last = self._record(logs, lr, wd, meter)
                    self.metrics.write(step, result.last)
                    if env.is_main:
                        bar.set_postfix_str(format_metrics(result.last))
                bar.update(1)  # a log line on log_every steps without a TTY (with the metrics above)
                if self.evaluate is not None and (
                    step == t.max_steps or (self.eval_every and step % self.eval_every == 0)
                ):
                    self._validate(step, result)
                if (step == t.max_steps or (t.save_every and step % t.save_every == 0)) and last_saved != step:
                    result.checkpoint, last_saved = self.save(step), step
            self._close_data()  # before the guard restores the SIGCHLD handler (see preemption.py)
        result.step = step
        self.metrics.close()
        return result

    def _validate(self, step: int, result: FitResult) -> None:
        assert self.evaluate is not None  # fit() validates only when given a callback
        self.engine.eval()
        try:
            with torch.no_grad():
                record = self.evaluate(step, self.engine.module)
        finally:
            self.engine.train()
        result.evals.append({"step": step, **record})
        self.metrics.write(step, {"split": "val", **record}, prefix="val/")

    def _optimizer_step(
        self, step: int, guard: PreemptionGuard, meter: ThroughputMeter, last_checkpoint: Path | None
    ) -> tuple[int, dict]:
        """``grad_accum_steps`` good micro-batches, each followed by ``engine.step()`` (DeepSpeed steps
        the optimizer at the accumulation boundary). Returns (stop: the number of the stop signal
        some rank received, 0 = none; abandon this step when set, last logs)."""
        t, world = self.cfg.train, self.env.world_size
        flags = torch.zeros(2, dtype=torch.float64)
        sync = torch.zeros(2, device=self.env.device, dtype=torch.float64)
        done, logs = 0, dict[str, float]()
        while done < t.grad_accum_steps:
            t0 = time.perf_counter()
            batch, failed = self._fetch(guard)
            # a fetch fails this way only after a stop request, so flags[0] > 0 whenever flags[1] is
            flags[0], flags[1] = float(guard.signum), float(failed)
            _all_reduce(flags, self._flags, dist.ReduceOp.MAX)
            if flags.max().item() > 0:
                return int(flags[0].item()) or int(signal.SIGTERM), logs
            assert batch is not None  # a failed fetch set flags[1] on this rank, so every rank returned above
            batch = self._device_batch(batch)
            meter.add_data_wait(time.perf_counter() - t0)
            loss, logs = self.engine(batch, step)
            finite = bool(torch.isfinite(loss.detach()).item())
            sync[0] = loss.detach().double() if finite else 0.0
            sync[1] = 0.0 if finite else 1.0
            _all_reduce(sync)
            if sync[1].item() > 0:
                self._skip(step, int(sync[1].item()), last_checkpoint)
                continue
            self._loss_sum += sync[0].item() / world
            self._loss_n += 1
            self.engine.backward(loss)
            self.engine.step()
            done += 1
        self._bad = 0
        return 0, logs

    def _skip(self, step: int, ranks: int, last_checkpoint: Path | None) -> None:
        """A micro-batch whose loss was NaN/inf on ``ranks`` rank(s): warn, or halt after too many."""
        self._bad += 1
        if self.env.is_main:
            log.warning(
                "step %d: non-finite loss on %d rank(s); micro-batch skipped (%d in a row)", step, ranks, self._bad
            )
        self.metrics.event("skip_nonfinite", step, consecutive=self._bad)
        if self._bad >= self.cfg.train.max_bad_steps:
            raise NonFiniteLoss(
                f"loss was NaN/inf for {self._bad} consecutive micro-batches at step {step}; lower --optim.lr, "
                f"raise --optim.warmup_steps or check the data (last checkpoint: {last_checkpoint or 'none'})"
            )

    def _record(self, logs: dict, lr: float, wd: float, meter: ThroughputMeter) -> dict:
        """Metrics record: rank-averaged objective logs (of the last micro-batch; every rank's objective
        returns the same keys), the mean loss since the last record, optimizer values, throughput."""
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)))
        vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.env.device)
        _all_reduce(vals)
        record = {k: v / self.env.world_size for k, v in zip(keys, vals.tolist())}
        record["loss"] = self._loss_sum / max(self._loss_n, 1)
        self._loss_sum, self._loss_n = 0.0, 0
        record["lr"], record["weight_decay"] = lr, wd
        gn = self.engine.get_global_grad_norm()
        gn = None if gn is None else float(gn.item() if isinstance(gn, torch.Tensor) else gn)
        if gn is not None and math.isfinite(gn):
            record["grad_norm"] = gn
        record.update(meter.snapshot())
        return record
