"""Stage train_ts: the time-series model trained on its token cache.

Two backends train the same model with the same loss:

xtuner  the real path: writes an XTuner `TrainerConfig` file (trainer_config.py) and launches
        `torchrun -m xtuner.v1.train.cli.sft --config trainer_config.py` with a fixed work_dir
        (auto_resume), then exports the last Hugging Face checkpoint. XTuner's trainer needs CUDA.
loop    for CPU-only machines (the demo, CI): a short loop of our own over the cached batches,
        packed by XTuner's collator, with XTuner's loss context, AdamW, warmup + cosine. It says so
        in the log, in summary.json and in MLflow (param backend=loop). It resumes from
        checkpoints/last.pt (or previous.pt when last.pt does not load).

`auto` picks xtuner when torch sees a GPU, else loop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from visionqc.arrow_cache import CacheRef
from visionqc.checkpoints import newest_complete, torch_file_problem
from visionqc.faults import pause_point
from visionqc.io import atomic_directory, atomic_write, write_json
from visionqc.options import options_from
from visionqc.plots import plot_losses
from visionqc.timeseries.collate import pack
from visionqc.timeseries.dataset import TimeSeriesCacheDataset
from visionqc.timeseries.model import MODEL_FILE, TimeSeriesModel, load_model
from visionqc.tracking import StageResult

BACKENDS = ("auto", "xtuner", "loop")


@dataclass
class TimeSeriesTrainOptions:
    backend: str = "auto"
    device: str = "auto"  # loop backend: auto | cpu | cuda
    steps: int = 150
    batch_size: int = 8  # records per step, packed into one sequence
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50  # steps between eval_loss on the held-out cache (0: at the end only)
    save_every: int = 50  # steps between resumable checkpoints
    pack_max_length: int = 4096  # xtuner backend: tokens per packed sequence
    gpus: int = 0  # xtuner backend: processes for torchrun (0: every visible GPU)

    def check(self, section: str) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"{section}.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    @classmethod
    def from_dict(cls, options: dict) -> TimeSeriesTrainOptions:
        return options_from(cls, options, "timeseries.train")


def choose_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    return "xtuner" if torch.cuda.is_available() else "loop"


def batches(count: int, batch_size: int, seed: int, start_step: int, steps: int):
    """Seeded epochs of shuffled indices, cut into batches; resumes at `start_step` with the same order."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for step in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(count, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        if step >= start_step:
            yield step, batch


def batch_loss(model: TimeSeriesModel, batch: dict) -> torch.Tensor:
    loss_ctx = model.build_loss_ctx_batch([batch])[0]
    return model(seq_ctx=batch["seq_ctx"], loss_ctx=loss_ctx)["loss"]


@torch.no_grad()
def evaluate_loss(model: TimeSeriesModel, dataset: TimeSeriesCacheDataset, batch_size: int, device: str) -> float:
    model.eval()
    losses, weights = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = pack(items, device)
        labelled = int((batch["shifted_labels"] != -100).sum())
        losses.append(float(batch_loss(model, batch)) * labelled)
        weights.append(labelled)
    model.train()
    return sum(losses) / max(1, sum(weights))


def _schedule(step: int, steps: int, warmup_ratio: float) -> float:
    warmup = max(1, round(steps * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(base: str | Path, train_cache: CacheRef, val_cache: CacheRef | None, work_dir: str | Path, model_out: str | Path,
               opts: TimeSeriesTrainOptions, log=print, on_step=None) -> dict:
    """The CPU loop backend; writes model_out and work_dir/checkpoints/ (last.pt, previous.pt); returns the summary with its history."""
    from visionqc.launch import resolve_device

    work_dir = Path(work_dir)
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    model = load_model(base, strict=False).to(device)
    model.train()
    train_set = TimeSeriesCacheDataset.read(train_cache)
    val_set = TimeSeriesCacheDataset.read(val_cache) if val_cache else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=opts.learning_rate, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, opts.steps, opts.warmup_ratio))
    checkpoints = work_dir / "checkpoints"
    history: list[dict] = []
    start = 0
    run_key = {"options": asdict(opts), "inputs": _inputs_key(base, train_cache, val_cache)}
    state = _resumable_state(checkpoints, run_key, device, log)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        log(f"resuming at step {start}")
    log(f"backend loop: XTuner's model, collator and loss, our own optimisation loop on {device} "
        f"(XTuner's Trainer needs CUDA); {opts.steps} steps of {opts.batch_size} records")
    began = time.perf_counter()
    for step, indices in batches(len(train_set), opts.batch_size, opts.seed, start, opts.steps):
        batch = pack([train_set[i] for i in indices], device)
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        entry = {"step": step + 1, "loss": round(loss.item(), 6), "grad_norm": round(grad_norm.item(), 6),
                 "learning_rate": scheduler.get_last_lr()[0]}
        done = step + 1 == opts.steps
        if val_set is not None and ((opts.eval_every and (step + 1) % opts.eval_every == 0) or done):
            entry["eval_loss"] = round(evaluate_loss(model, val_set, opts.batch_size, device), 6)
        history.append(entry)
        if on_step is not None:
            on_step(entry)
        if (step + 1) % 10 == 0 or done or "eval_loss" in entry:
            log(json.dumps(entry))
        if (opts.save_every and (step + 1) % opts.save_every == 0) or done:
            _save_checkpoint(checkpoints, model, optimizer, scheduler, step + 1, history, run_key)
            pause_point(f"train_ts:step-{step + 1}")
    seconds = time.perf_counter() - began
    model.eval()
    with atomic_directory(model_out) as work:
        model.save_hf(work)
        _copy_tokenizer(Path(base) / "llm", work / "llm")
    return {"backend": "loop", "device": device, "steps": opts.steps, "steps_run_now": opts.steps - start,
            "seconds": round(seconds, 2), "seconds_per_step": round(seconds / max(1, opts.steps - start), 4),
            "first_loss": history[0]["loss"] if history else None, "final_loss": history[-1]["loss"] if history else None,
            "eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
            "first_eval_loss": next((h["eval_loss"] for h in history if "eval_loss" in h), None), "history": history}


def _inputs_key(base: str | Path, train_cache: CacheRef, val_cache: CacheRef | None) -> dict:
    """What a resumable checkpoint must match besides the options: the cache keys and the base model's descriptors."""
    base = Path(base)
    caches = {"train": train_cache.key, "val": val_cache.key if val_cache else None}
    described = {name: (base / name).read_text() for name in (MODEL_FILE, "llm/config.json", "encoder/config.json") if (base / name).exists()}
    return {"base": str(base.resolve()), "caches": caches, "base_files": described}


STATE_KEYS = ("model", "optimizer", "scheduler", "step", "history", "run_key")
# Oldest first. A save moves last.pt to previous.pt, then writes last.pt atomically: a kill at any moment leaves one whole file.
CHECKPOINT_FILES = ("previous.pt", "last.pt")


def _resumable_state(folder: Path, run_key: dict, device: str, log) -> dict | None:
    """The state of the newest checkpoint that loads whole and was written for these options and inputs."""
    loaded = {}

    def problem(path: Path) -> str | None:
        reason = torch_file_problem(path)
        if reason:
            return reason
        try:
            state = torch.load(path, map_location=device, weights_only=False)
        except Exception as exc:  # a pickle that does not load, whatever torch raises for it
            return f"does not load ({type(exc).__name__}: {exc})"
        if not isinstance(state, dict) or not set(STATE_KEYS) <= set(state):
            return f"lacks {', '.join(k for k in STATE_KEYS if not isinstance(state, dict) or k not in state)}"
        if state["run_key"] != run_key:
            return "was written for other options or inputs"
        loaded[path] = state
        return None

    found = newest_complete([folder / name for name in CHECKPOINT_FILES if (folder / name).exists()], problem, log=log)
    if found is not None:
        log(f"resuming from {found}")
    return loaded.get(found)


def _save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, history: list, run_key: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "history": history, "run_key": run_key}
    if (folder / "last.pt").exists():
        os.replace(folder / "last.pt", folder / "previous.pt")
    with atomic_write(folder / "last.pt", "wb", encoding=None) as handle:
        torch.save(state, handle)


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)


# --- the real XTuner trainer ---------------------------------------------------------------------

TRAINER_CONFIG_TEMPLATE = '''\
# XTuner V1 trainer config written by `visionqc train-ts` from config/config.yaml (timeseries.*).
# Rerun the rule instead of editing it. Run by hand: torchrun --nproc_per_node N -m xtuner.v1.train.cli.sft --config {config_name}
from xtuner.v1.config import AdamWConfig, FSDPConfig, LRConfig
from xtuner.v1.datasets.config import DataloaderConfig, DatasetConfig
from xtuner.v1.train.trainer import TrainerConfig

from visionqc.timeseries.model import TimeSeriesModelConfig, text_config_from
from visionqc.timeseries.tokenize import TimeSeriesTokenizeFnConfig

model_cfg = TimeSeriesModelConfig(
    encoder_path={encoder!r},
    text_config=text_config_from({llm!r}, attn_impl="flash_attention", compile_model=False),
    ts_token_id={ts_token_id},
    channels={channels},
    target_rate={target_rate},
)
dataset_config = [
    {{
        "dataset": DatasetConfig(anno_path={train_records!r}, name="signals", cache_dir={xtuner_cache!r}),
        "tokenize_fn": TimeSeriesTokenizeFnConfig(
            # max_length stays None: cache_ts checked these records with the same function (same hash)
            encoder_path={encoder!r}, target_rate={target_rate}, channels={channels}, media_root={media_root!r}, max_length=None
        ),
    }}
]
dataloader_cfg = DataloaderConfig(
    dataset_config_list=dataset_config,
    collator={collator!r},
    pack_level="soft",
    pack_max_length={pack_max_length},
    num_workers=0,
)
trainer = TrainerConfig(
    model_cfg=model_cfg,
    load_from={base!r},
    tokenizer_path={llm!r},
    dataloader_cfg=dataloader_cfg,
    optim_cfg=AdamWConfig(lr={learning_rate}, weight_decay={weight_decay}),
    lr_cfg=LRConfig(lr_type="cosine", warmup_ratio={warmup_ratio}, lr_min=0.0),
    # max_length {max_length}: the longest record cache_ts accepted
    fsdp_cfg=FSDPConfig(),
    global_batch_size={global_batch_size},
    total_step={steps},
    work_dir={work_dir!r},
    auto_resume=True,
    strict_load=False,
    checkpoint_interval={save_every},
    hf_interval={steps},
    seed={seed},
    exp_tracker="jsonl",
)
'''


def write_trainer_config(path: str | Path, *, base: str | Path, train_records: str | Path, work_dir: str | Path,
                         opts: TimeSeriesTrainOptions, target_rate: float, channels: int, max_length: int, ts_token_id: int,
                         world_size: int = 1) -> Path:
    """Write the XTuner TrainerConfig (a Python file, as `xtuner.v1.train.cli.sft --config` reads it)."""
    from visionqc.timeseries.collate import COLLATOR

    base, path = Path(base).resolve(), Path(path)
    text = TRAINER_CONFIG_TEMPLATE.format(
        config_name=path.name, encoder=str(base / "encoder"), llm=str(base / "llm"), base=str(base), ts_token_id=ts_token_id,
        channels=channels, target_rate=float(target_rate), train_records=str(Path(train_records).resolve()),
        media_root=str(Path(train_records).resolve().parent), xtuner_cache=str(Path(work_dir).resolve() / "dataset-cache"),
        max_length=max_length, collator=COLLATOR, pack_max_length=opts.pack_max_length, learning_rate=opts.learning_rate,
        weight_decay=opts.weight_decay, warmup_ratio=opts.warmup_ratio, global_batch_size=max(1, world_size),
        steps=opts.steps, work_dir=str(Path(work_dir).resolve()), save_every=opts.save_every or opts.steps, seed=opts.seed,
    )
    with atomic_write(path) as handle:
        handle.write(text)
    return path


def load_trainer_config(path: str | Path):
    """The `trainer` object of a config file, validated by XTuner's own TrainerConfig."""
    from xtuner.v1.utils import Config

    return Config.fromfile(str(path))["trainer"]


def train_xtuner(config_file: Path, work_dir: Path, model_out: Path, base: Path, gpus: int, log=print) -> dict:
    """Launch XTuner's sft entry point under torchrun and export its last Hugging Face checkpoint to model_out."""
    nproc = gpus or torch.cuda.device_count()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "xtuner.v1.train.cli.sft", "--config", str(config_file)]
    log("backend xtuner: " + " ".join(command))
    began = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - began
    exported = sorted((p for p in work_dir.rglob(MODEL_FILE)), key=lambda p: p.stat().st_mtime)
    if not exported:
        raise RuntimeError(f"XTuner finished but no Hugging Face export ({MODEL_FILE}) is under {work_dir}; see its log")
    with atomic_directory(model_out) as work:
        shutil.copytree(exported[-1].parent, work, dirs_exist_ok=True)
        _copy_tokenizer(base / "llm", work / "llm")
    history = _xtuner_history(work_dir)
    return {"backend": "xtuner", "device": f"cuda x{nproc}", "seconds": round(seconds, 2), "export": str(exported[-1].parent),
            "steps": len(history), "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None, "history": history}


def _xtuner_history(work_dir: Path) -> list[dict]:
    """Step and loss from XTuner's jsonl experiment tracker (exp_tracker="jsonl")."""
    history = []
    for file in sorted(work_dir.rglob("*.jsonl")):
        if "dataset-cache" in file.parts:
            continue
        for line in file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            loss = entry.get("lm_loss", entry.get("loss", entry.get("reduced_llm_loss")))
            if isinstance(entry, dict) and "step" in entry and isinstance(loss, (int, float)):
                history.append({"step": int(entry["step"]), "loss": float(loss)})
    return sorted(history, key=lambda h: h["step"])


def backend_note(backend: str) -> str:
    return "XTuner Trainer (torchrun)" if backend == "xtuner" else "CPU loop of our own: XTuner model, collator and loss"


def train_ts(base: str | Path, train_cache: str | Path, val_cache: str | Path | None, train_records: str | Path, *,
             model_out: str | Path, summary_out: str | Path, trainer_config_out: str | Path, loss_plot: str | Path,
             history_out: str | Path, work_dir: str | Path, options: dict | None = None, log=print, on_step=None) -> StageResult:
    """Train with the chosen backend; writes every output path given. The signal shape (rate, channels, max_length)
    comes from the train cache's manifest. `work_dir` holds the resumable state (checkpoints/, xtuner/)."""
    opts = TimeSeriesTrainOptions.from_dict(dict(options or {}))
    base, work_dir = Path(base), Path(work_dir)
    train_ref = CacheRef.read(train_cache)
    val_ref = CacheRef.read(val_cache) if val_cache else None
    shape = train_ref.options
    backend = choose_backend(opts.backend)
    ts_token_id = json.loads((base / MODEL_FILE).read_text())["ts_token_id"]
    config_file = write_trainer_config(trainer_config_out, base=base, train_records=train_records, work_dir=work_dir / "xtuner",
                                       opts=opts, target_rate=shape["target_rate"], channels=shape["channels"],
                                       max_length=shape["max_length"], ts_token_id=ts_token_id,
                                       world_size=opts.gpus or max(1, torch.cuda.device_count()))
    if backend == "xtuner":
        summary = train_xtuner(config_file, work_dir / "xtuner", Path(model_out), base, opts.gpus, log)
    else:
        summary = train_loop(base, train_ref, val_ref, work_dir, model_out, opts, log, on_step)
    history = summary.pop("history", [])
    if backend == "xtuner" and on_step is not None:  # the loop reports each step as it goes
        for entry in history:
            on_step(entry)
    summary = {**summary, "options": asdict(opts), "trainer_config": str(config_file)}
    with atomic_write(history_out) as handle:
        handle.writelines(json.dumps(entry) + "\n" for entry in history)
    plot_losses(history, Path(loss_plot))
    write_json(summary_out, summary)
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageResult(
        report=summary, metrics=metrics, step=summary.get("steps") or 0,
        params={"backend": backend, "backend_note": backend_note(backend),
                **{k: shape[k] for k in ("target_rate", "channels", "max_length")}},
        artifacts=[loss_plot, summary_out, trainer_config_out, history_out],
        inputs={"train_cache": train_ref.folder, "val_cache": val_ref.folder if val_ref else "", "base": base},
        outputs={"model": model_out},
    )
