"""Benchmarks: one program per subject, each holding its cases and providers, all on one harness
(harness.py: command line, timing, table, JSON file with the environment record). Programs are not
tests; each measures its baseline in the same run.

    python -m launchers.bench.lora_linear     LoRA linear: torch path, reference, merged weight, PEFT, Triton
    python -m launchers.bench.attention       attention: Triton flash kernel, SDPA backends, xformers, reference
    python -m launchers.bench.ptxas           static compile report of the Triton kernels (no GPU needed)
    python -m launchers.bench.train           training steps/s under ZeRO-0/2/3; ExPLoRA vs full optimizer state
    python -m launchers.bench.data            per-file GeoTIFF loader vs the shard stream
    python -m launchers.bench.augment         DINOv2 multi-crop augmentation in the worker or on the device
    python -m launchers.bench.convert         the converter vs raw rasterio reads
    python -m launchers.bench.teacher_memory  shared-base vs deep-copy EMA teacher memory
    bash launchers/bench/gpu_check.sh         the one-shot GPU check (tests, kernels.verify, benchmarks)
"""
