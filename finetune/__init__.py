"""The fine-tuning trainer behind `train.py`, one responsibility per module.

A run flows top-down through these layers (ARCHITECTURE.md has the whole picture):

    config/    command line and recipe files -> the argument dataclasses of train.py; validate(); resolvers
    checks/    preflight: paths, disk, wandb, hub, sharding, the model's config on a meta device
    data/      records -> rendered -> tokenized once -> filtered / packed -> collated
    modeling/  tokenizer, model loading, LoRA adapters, training knobs (freezing, RoPE scaling)
    training/  the Trainer subclass, its callbacks, throughput, the dry-run plan, and the stage stack
    outputs/   final save, streamed merge, inference, reports and model card, hub push

Shared below all of them: errors.py (UsageError), fileio.py (atomic writes, disk space), runtime.py (rank,
accelerator, logging), run_paths.py (where a run reads and writes).
"""
