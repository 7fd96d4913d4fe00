"""Regenerate each profile's per-rule threads and resources from the stage table (src/visionqc/stages.py).

    .venv/bin/python workflow/scripts/profiles.py

Everything above the marker line of a profile is kept as written; everything below it is generated.
"""

from __future__ import annotations

import sys
from pathlib import Path

from visionqc.stages import CPU, STAGES

ROOT = Path(__file__).resolve().parents[2]
MARKER = "# Generated from src/visionqc/stages.py by workflow/scripts/profiles.py; edit the table, not these lines."
GPU_PARTITION = "'$VISIONQC_SLURM_GPU_PARTITION'"


def generated(profile: str) -> dict:
    """set-threads and set-resources of every rule that runs on a node: Slurm asks for the stage's cluster resources
    (GPU stages on the GPU partition with one GPU); a local run gives the threads (capped at the machine's cores)
    and no GPU count, since local jobs find their device themselves."""
    threads, resources = {}, {}
    for stage in STAGES:
        if stage.local:
            continue
        need = stage.resources
        for rule in stage.rules:
            threads[rule] = need.threads
            if profile == "slurm" and (need.gpu, need.mem_mb, need.runtime) != (CPU.gpu, CPU.mem_mb, CPU.runtime):
                # else default-resources: 4000 MB and 30 min, × attempt
                extra = {"slurm_partition": GPU_PARTITION, "gpu": 1} if need.gpu else {}
                resources[rule] = {**extra, "mem_mb": need.mem_mb, "runtime": f"{need.runtime} * attempt"}
    return {"set-threads": threads, **({"set-resources": resources} if resources else {})}


def _yaml(value) -> str:
    """Scalars as a profile writes them: expressions bare, the partition variable in double quotes."""
    return f'"{value}"' if isinstance(value, str) and value.startswith("'") else str(value)


def render(profile: str) -> str:
    path = ROOT / "workflow/profiles" / profile / "config.yaml"
    lines = [path.read_text().split(MARKER)[0].rstrip("\n"), "", MARKER]
    for section, rules in generated(profile).items():
        lines.append(f"{section}:")
        for rule, value in rules.items():
            if isinstance(value, dict):
                lines += [f"  {rule}:", *(f"    {key}: {_yaml(v)}" for key, v in value.items())]
            else:
                lines.append(f"  {rule}: {_yaml(value)}")
    return "\n".join(lines) + "\n"


def main() -> int:
    for profile in ("local", "slurm"):
        path = ROOT / "workflow/profiles" / profile / "config.yaml"
        path.write_text(render(profile))
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
