"""DeepSpeed in one process, on CPU or GPU, configured from a model profile's ``train`` section.

The profile chooses the ZeRO stage (0-3), where optimizer state and parameters live
(``offload_optimizer``/``offload_params``: ``cpu`` keeps them in host memory), the
micro-batch size and gradient accumulation. The profile's precision picks mixed precision:
bf16 (no loss scaling needed), fp16 (DeepSpeed's dynamic loss scaling; GPU only) or fp32.
DeepSpeed's engine then does what a training loop would otherwise get wrong: it scales
losses, accumulates gradients over micro-batches, clips them and steps optimizer and
learning-rate schedule only at accumulation boundaries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
from pathlib import Path

import torch

from helixflow.profiles import check_train_settings

ADAMW = {"lr": 5.0e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
GRADIENT_CLIPPING = 1.0
WARMUP_FRACTION = 0.1
WORLD_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def configure_process(device: torch.device) -> None:
    """Set what DeepSpeed reads at import and initialisation.

    The accelerator follows ``device`` (``DS_ACCELERATOR=cpu`` on CPU); compiled ops are
    cached per Python environment (``TORCH_EXTENSIONS_DIR``, unless set). Unless a launcher
    (``deepspeed``, ``torchrun``, SLURM) already set ``RANK``, the process is a one-rank
    world on a free local port, so DeepSpeed does not look for MPI.
    """
    os.environ["DS_ACCELERATOR"] = "cpu" if device.type == "cpu" else "cuda"
    # DeepSpeed compiles its CPU Adam on first use; one build folder per Python environment,
    # or two environments on a machine (a checkout's and a CI clone's) rebuild each other's.
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"env-{environment}"))
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(zip(WORLD_VARIABLES, ("0", "0", "1", "127.0.0.1", str(port))))


def warmup_decay(total_steps: int):
    """Learning-rate factor of each optimizer step (0-based), for ``torch.optim.lr_scheduler.LambdaLR``.

    Linear warm-up over the first tenth of the steps (the first step already moves), then
    linear decay towards zero at ``total_steps``. DeepSpeed's own WarmupDecayLR would
    spend the first two steps at a learning rate of zero.
    """
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def deepspeed_config(train: dict, *, precision: str, device_type: str) -> dict:
    """The DeepSpeed configuration for a profile's ``train`` section.

    Parameters
    ----------
    train
        The profile's ``train`` section (batch_size, gradient_accumulation, zero_stage,
        offload_optimizer, offload_params, learning_rate).
    precision
        ``fp32``, ``bf16`` or ``fp16``.
    device_type
        ``cpu`` or ``cuda``.
    """
    check_train_settings(train, precision=precision, device=device_type)
    pin_memory = device_type == "cuda"
    zero = {"stage": train["zero_stage"]}
    if train["offload_optimizer"] != "none":
        zero["offload_optimizer"] = {"device": train["offload_optimizer"], "pin_memory": pin_memory}
    if train["offload_params"] != "none":
        zero["offload_param"] = {"device": train["offload_params"], "pin_memory": pin_memory}
    config = {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": train["gradient_accumulation"],
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
    }
    if train["offload_optimizer"] != "none":
        # Offloaded optimizer state is stepped by DeepSpeed's CPU Adam (AdamW mode).
        config["optimizer"] = {"type": "AdamW", "params": {**ADAMW, "lr": train["learning_rate"], "betas": list(ADAMW["betas"])}}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    return config


def initialize(model: torch.nn.Module, train: dict, *, precision: str, device: torch.device, total_steps: int):
    """Wrap ``model`` in a DeepSpeed engine that trains its parameters that require gradients.

    The engine steps the learning-rate schedule (:func:`warmup_decay` over ``total_steps``
    optimizer steps) at each accumulation boundary and saves it with checkpoints.
    """
    configure_process(device)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = deepspeed_config(train, precision=precision, device_type=device.type)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = None if "optimizer" in config else torch.optim.AdamW(trainable, **{**ADAMW, "lr": train["learning_rate"]})
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=config,
        lr_scheduler=lambda basic_optimizer: torch.optim.lr_scheduler.LambdaLR(basic_optimizer, warmup_decay(total_steps)),
    )
    return engine


def gathered_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full weights of the engine's model as fp32 CPU tensors, gathered first under ZeRO-3."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {name: tensor.detach().float().cpu().clone() for name, tensor in engine.module.state_dict().items()}
