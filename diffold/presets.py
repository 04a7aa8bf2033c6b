"""Presets: overlays of dotted keys applied after the YAML file (see README, Presets)."""

PRESETS: dict[str, dict[str, object]] = {
    # Sensible defaults: health checks on, skip non-finite steps, roll back after 3 bad steps, on a
    # confirmed spike / a loss held above health.loss_cap, and at once on non-finite or exploded weights.
    "balanced": {},
    # Throughput first: bf16, torch.compile, rarer logging and checkpoints, lighter checks.
    "performance": {
        "training.mixed_precision": "bf16",
        "model.compile": True,
        "training.log_every": 50,
        "checkpoint.save_every_steps": 2000,
        "health.window": 100,
        "data.num_workers": 4,
    },
    # Stability first: lower LR, tighter clipping, rollback on spikes, stricter thresholds.
    "safety": {
        "training.optimizer.lr": 1e-4,
        "training.max_grad_norm": 0.5,
        "health.spike_sigma": 4.0,
        "health.rollback_on_spike": True,
        "health.max_bad_steps": 2,
        "health.grad_norm_max": 1e2,
        "checkpoint.save_every_steps": 200,
        "training.ema_decay": 0.9995,
    },
    # Fit bigger models/crops: activation checkpointing, bf16, smaller micro-batch x more accumulation.
    "memory": {
        "model.activation_checkpointing": True,
        "model.pair_chunk_size": 64,
        "training.mixed_precision": "bf16",
        "training.batch_size": 1,
        "training.gradient_accumulation_steps": 8,
        "health.memory_cleanup": True,
        "health.oom_recovery": True,
    },
    # Find bugs fast: tiny model, log every step, validate often, verbose logging.
    "debug": {
        "model.size": "tiny",
        "training.log_every": 1,
        "training.validate_every_steps": 20,
        "checkpoint.save_every_steps": 20,
        "logging.log_level": "DEBUG",
        "logging.progress_bar": False,
        "validation.num_samples": 2,
    },
}
