"""Extended pre-training under DeepSpeed: ``loop.Trainer`` (steps, accumulation, NaN skipping,
preemption, resume), ``deepspeed_setup`` (ZeRO/precision/AdamW from RunConfig), ``checkpoint``,
``schedules``, ``metrics``/``flops``, ``export`` (adapter + merged weights, ZeRO-3 gathered),
``process_group`` (deepspeed / torchrun / plain python), ``collectives`` (injected into objectives).
Modules are imported directly (``from engine.trainer.loop import Trainer``); this package file
stays empty so that importing ``engine.trainer.collectives`` stays light."""
