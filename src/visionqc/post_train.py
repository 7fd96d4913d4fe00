"""Stage post_train: GRPO from a supervised run's merged model, rewarded by rewards.py.

ms-swift runs everything (`SwiftRLHF` with `rlhf_type: grpo`: rollouts, rewards, advantages, the KL
to the reference model). GRPO generates from prompts, so it reads prompt rows, not cached tokens:
each record of the fused train split becomes the messages the cache encoded (same prompts, same
message options, read from the train cache's manifest) minus its last answer, which becomes the
row's `solution`. A row's `task` is `verdict` when that answer is a two-line verdict and `summary`
when it is a valid summary of an image record; the recipe's `reward_funcs` choose the tasks
trained, and every other record is counted in the summary by reason.

Outputs (each path given by the rule): the model folder (weights or adapter of the last step, with
the processor), summary.json, log_history.json, completions.jsonl (ms-swift's completions of every
logging step, one row each, with the rewards that scored them) and rewards.png. Work folder: `<checkpoints>/<fingerprint>/`, resumable.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

from visionqc import rewards
from visionqc.arrow_cache import CacheRef
from visionqc.checkpoints import checkpoint_folders, export_model, finished_training, resumable_checkpoint, trainer_history
from visionqc.contract import parse_summary
from visionqc.io import follow_umask, read_jsonl, write_json, write_jsonl
from visionqc.launch import SWIFT_DEFAULTS, launched_rank, swift_device_arguments
from visionqc.messages import build_messages, parse_verdict, record_mode
from visionqc.plots import plot_rewards
from visionqc.tracking import StageResult
from visionqc.vision import PixelBudget

# Our defaults under every GRPO recipe; the recipe may override any of them.
BASE_ARGUMENTS = {**SWIFT_DEFAULTS, "eval_strategy": "no", "log_completions": True}


def prompt_task(record: dict, answer, default_mode: str) -> str | None:
    """verdict, summary, or None (a record GRPO has no reward for)."""
    if not isinstance(answer, str):
        return None
    if parse_verdict(answer)[2]:
        return "verdict"
    if record_mode(record, default_mode) == "summary" and parse_summary(answer).valid:
        return "summary"
    return None


def prompt_rows(records: Path, options: dict, tasks: set[str]) -> tuple[list[dict], dict]:
    """The fused records as GRPO prompt rows of the given tasks, and the count of every record by what became of it."""
    rows, fate = [], Counter()
    for _, record in read_jsonl(records):
        messages = build_messages(record, records.parent, options["prompts"], options.get("images_per_turn", 0),
                                  options.get("default_mode", "dense"))["messages"]
        answer = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None
        task = prompt_task(record, answer, options.get("default_mode", "dense"))
        if task is None:
            fate["skipped: no summary or verdict answer"] += 1
        elif task not in tasks:
            fate[f"skipped: {task} (no reward for it in the recipe)"] += 1
        else:
            rows.append({"messages": messages[:-1], "task": task, "solution": answer})
            fate[f"prompt: {task}"] += 1
    return rows, dict(sorted(fate.items()))


def reward_tasks(reward_funcs: list[str]) -> set[str]:
    unknown = [name for name in reward_funcs if name not in rewards.REWARDS]
    if unknown or not reward_funcs:
        raise ValueError(f"the recipe's reward_funcs {unknown or '(none)'} are not ours; "
                         f"name some of: {', '.join(rewards.REWARDS)}")
    return {rewards.REWARDS[name][1] for name in reward_funcs}


def metric_names(log: dict) -> dict:
    """swift's GRPO log → our MLflow names: `rewards/<name>/mean` → `reward/<name>`; the rest as swift names it."""
    named = {}
    for key, value in log.items():
        if not isinstance(value, (int, float)):
            continue
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "rewards" and parts[2] == "mean":
            named[f"reward/{parts[1]}"] = value
        elif not (parts[0] == "rewards" and parts[-1] == "std"):
            named[key] = value
    return named


def refuse_too_few_prompts(prompts: int, arguments: dict, fate: dict) -> None:
    """One rollout samples generation_batch_size / num_generations prompts, and ms-swift drops an incomplete one: with
    fewer prompts than that it trains no step. Say so before the model loads."""
    world = launched_rank()[1]
    batch = arguments.get("generation_batch_size") or (int(arguments.get("per_device_train_batch_size") or 8)
                                                       * int(arguments.get("gradient_accumulation_steps") or 1) * world)
    needed = int(batch) // int(arguments.get("num_generations") or 8)
    if prompts < needed:
        raise ValueError(f"{prompts} prompt(s) ({fate}), but one rollout takes {needed} (generation_batch_size {batch} / "
                         f"num_generations {arguments.get('num_generations') or 8}): lower generation_batch_size, or reward "
                         "more tasks, or add records")


def post_train_grpo(model_dir: str, records: str | Path, cache: str | Path, recipe: dict, *, model_out: str | Path,
                    summary_out: str | Path, history_out: str | Path, completions_out: str | Path, rewards_plot: str | Path,
                    checkpoints: str | Path, device: str = "auto", on_log=None) -> StageResult | None:
    """GRPO of `model_dir` on the prompts of `records`; writes every output path given. None off rank 0.
    A rerun resumes from the newest complete checkpoint; one that holds the last step is exported without training."""
    ref = CacheRef.read(cache)
    options = ref.options
    PixelBudget.from_cache_options(options).export_to_swift()
    recipe = copy.deepcopy(recipe)  # swift changes list arguments in place (reward_funcs)
    if recipe.pop("rlhf_type", "grpo") != "grpo":
        raise ValueError("post_train runs rlhf_type: grpo only (GKD is a train_model recipe)")
    tasks = reward_tasks(list(recipe.get("reward_funcs") or []))
    records = Path(records)
    rows, fate = prompt_rows(records, options, tasks)
    missing = sorted(tasks - {row["task"] for row in rows})
    if missing:
        raise ValueError(f"the recipe rewards {', '.join(missing)} answers, but {records} holds no such prompt ({fate})")
    arguments = {**BASE_ARGUMENTS, **recipe, "rlhf_type": "grpo", "model": model_dir,
                 "model_type": options["model_type"], "template": options["template"], **swift_device_arguments(device, recipe)}
    refuse_too_few_prompts(len(rows), arguments, fate)
    digest = hashlib.sha256(json.dumps({"arguments": arguments, "rows": rows}, sort_keys=True, ensure_ascii=False).encode())
    run_dir = Path(checkpoints) / digest.hexdigest()[:16]
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts = run_dir / "prompts.jsonl"
    write_jsonl(prompts, rows)
    found = resumable_checkpoint(run_dir, optimizer=not arguments.get("save_only_model"))
    if found and finished_training(found):
        print(f"{found} is the run's last step: exporting it, nothing to train", flush=True)
        history = trainer_history(found)
        for entry in history if on_log else []:
            on_log(metric_names(entry), entry["step"])
    else:
        if found:
            print(f"resuming from {found}", flush=True)
        history = run_grpo(arguments, prompts, run_dir, found, on_log)
        follow_umask(run_dir)
    last = checkpoint_folders(run_dir)[-1]
    if launched_rank()[0] != 0:
        return None
    export_model(last, model_out)
    write_jsonl(completions_out, completion_rows(run_dir / "completions.jsonl"))
    write_json(history_out, {"log_history": history})
    plot_rewards(history, rewards_plot)
    summary = summarize(history, fate, found, last)
    write_json(summary_out, summary)
    return StageResult(
        report=summary, metrics={k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=summary["steps"],
        params={"template": arguments["template"], "tasks": ",".join(sorted(tasks))},
        artifacts=[rewards_plot, history_out, completions_out],
        inputs={"base": model_dir, "records": records, "train_cache": ref.folder}, outputs={"model": model_out},
    )


def completion_rows(swift_log: Path) -> list[dict]:
    """ms-swift's completions.jsonl (per logging step, one list per column, NaN where a reward skipped the prompt) →
    one row per completion: step, prompt, completion, solution, the rewards that scored it, and its advantage."""
    if not swift_log.exists():
        return []
    rows = []
    for line in swift_log.read_text("utf-8").splitlines():
        columns = json.loads(line)  # the standard parser: swift writes NaN
        for i, completion in enumerate(columns.get("completion", [])):
            scored = {name: columns[name][i] for name in rewards.REWARDS if name in columns and not math.isnan(columns[name][i])}
            rows.append({"step": int(columns["step"][i]), "prompt": columns["prompt"][i], "completion": completion,
                         "solution": columns.get("solution", [None] * (i + 1))[i], "rewards": scored,
                         "advantage": columns["advantages"][i] if "advantages" in columns else None})
    return rows


def run_grpo(arguments: dict, prompts: Path, run_dir: Path, found: Path | None, on_log) -> list[dict]:
    """GRPO through ms-swift's RLHF pipeline with our rewards registered; returns its log history."""
    from swift.arguments import RLHFArguments
    from swift.pipelines.train.rlhf import SwiftRLHF
    from transformers import TrainerCallback

    rewards.register()
    try:
        grpo_args = RLHFArguments(**arguments, dataset=[str(prompts)], output_dir=str(run_dir),
                                  resume_from_checkpoint=str(found) if found else None)
    except ValueError as exc:  # the rollout sizes (num_generations, generation_batch_size, …) among them
        raise ValueError(f"the GRPO recipe cannot run: {exc}") from exc

    class LogForwarder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log and logs:
                on_log(metric_names(logs), state.global_step)

    class GrpoRun(SwiftRLHF):
        def train(self, trainer):
            trainer.add_callback(LogForwarder())
            return super().train(trainer)

    return GrpoRun(grpo_args).main()["log_history"]


def summarize(history: list[dict], fate: dict, resumed: Path | None, last: Path) -> dict:
    steps = [h for h in history if "reward" in h]
    summary = {"resumed_from": str(resumed) if resumed else None, "checkpoint": str(last),
               "steps": max((h["step"] for h in history), default=0), "records": fate,
               "prompts": sum(n for fate_of, n in fate.items() if fate_of.startswith("prompt"))}
    runtime = next((h["train_runtime"] for h in history if "train_runtime" in h), None)
    if runtime is not None:
        summary["train_seconds"] = runtime
    if steps:
        summary.update(first_reward=steps[0]["reward"], last_reward=steps[-1]["reward"], last_kl=steps[-1].get("kl", 0.0))
        for name in rewards.REWARDS:
            points = [h[f"rewards/{name}/mean"] for h in steps if f"rewards/{name}/mean" in h]
            if points:
                summary[f"first_{name}"], summary[f"last_{name}"] = points[0], points[-1]
    return summary
