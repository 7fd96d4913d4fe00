"""ms-swift plugin file: `swift rlhf --external_plugins src/visionqc/swift_plugin.py` registers our GRPO rewards."""

from visionqc.rewards import register

register()
