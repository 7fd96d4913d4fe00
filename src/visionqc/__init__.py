"""VisionQC: annotation exports to a fine-tuned Qwen3-VL inspection model and group verdicts."""

__version__ = "0.1.0"
