"""Devices and ranks: what a process learns from torchrun's environment.

Rules start one process per job, or `torchrun --nproc_per_node <gpus>` when a job holds several
GPUs (rules/common.smk). A stage then asks here which device it owns and which rank it is.
"""

from __future__ import annotations

import os

DEVICES = ("auto", "cpu", "cuda")


def launched_rank() -> tuple[int, int]:
    """(rank, world size) set by torchrun; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str) -> str:
    """auto: this process's GPU when one is visible, else cpu; cuda: this process's GPU (cuda:LOCAL_RANK)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if device == "cuda":
            raise RuntimeError("device cuda was asked for but torch sees no GPU; set train.device: auto or cpu")
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"


# How every stage runs ms-swift, under its own defaults and the recipe: offline, fixed output folder, seeded.
SWIFT_DEFAULTS = {
    "attn_impl": "sdpa",
    "dataloader_num_workers": 0,
    "dataset_num_proc": 1,
    "report_to": ["none"],  # our log callback sends everything to MLflow
    "check_model": False,  # no modelscope lookups (seconds of network retries offline)
    "add_version": False,  # the rule's fixed path, not <output_dir>/v<N>-<time>/
    "logging_steps": 5,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "split_dataset_ratio": 0.0,
    "gradient_accumulation_steps": 1,
    "seed": 42,
    "data_seed": 42,
}


def swift_device_arguments(device: str, recipe: dict) -> dict:
    """ms-swift's device arguments: float32 on the CPU (use_cpu), bfloat16 on a GPU, unless the recipe sets torch_dtype."""
    if resolve_device(device) == "cpu":
        return {"torch_dtype": recipe.get("torch_dtype", "float32"), "use_cpu": True}
    return {"torch_dtype": recipe.get("torch_dtype", "bfloat16")}


def wait_for_all_ranks() -> None:
    """Barrier across torchrun's processes (gloo, so it also works on CPU-only jobs)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
