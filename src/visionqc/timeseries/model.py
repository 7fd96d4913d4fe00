"""The time-series model: a Hugging Face encoder (AutoModel) → a small projector → an XTuner language model.

forward embeds the tokens, encodes every signal (each channel on its own, features side by
side), projects the frames and writes them over the `<TS_CONTEXT>` positions in order, then runs
the language model with XTuner's loss context. A batch without signals still runs the encoder
on a dummy signal, multiplied by zero, so every parameter stays in the graph (DDP/FSDP need that).

On GPUs XTuner's Trainer builds it on the meta device, shards it with FSDP and loads it with
from_hf; those distributed paths are written to XTuner's contract but have not run yet (no GPU
was available); the CPU paths are tested.

A saved model is a folder:

    encoder/               the encoder, save_pretrained (AutoModel loads it)
    llm/                   the language model in Hugging Face format (+ the tokenizer)
    projector.safetensors  the projector
    timeseries.json        ts_token_id, channels, target_rate
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from pydantic import ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn
from xtuner.v1.model.base import BaseModel, ModelOutputs, XTunerBaseModelConfig
from xtuner.v1.model.dense.qwen3 import Qwen3DenseConfig
from xtuner.v1.utils import get_device

from visionqc.timeseries.collate import TimeSeriesSequenceContext

MODEL_FILE = "timeseries.json"
PROJECTOR_FILE = "projector.safetensors"


class TimeSeriesModelConfig(XTunerBaseModelConfig):
    model_config = ConfigDict(title="visionqc time-series model", extra="forbid", arbitrary_types_allowed=True)
    encoder_path: str  # a Hugging Face encoder folder (wav2vec2-style: conv front end over raw samples)
    text_config: Qwen3DenseConfig
    ts_token_id: int
    channels: int = 1
    target_rate: float = 50.0
    freeze_encoder: bool = False
    freeze_language: bool = False

    @property
    def hf_config(self):
        return None  # saved by TimeSeriesModel.save_hf, not as one Hugging Face checkpoint

    def build(self) -> TimeSeriesModel:
        return TimeSeriesModel(self)


def text_config_from(llm_dir: str | Path, attn_impl: str = "eager_attention", compile_model: bool = False) -> Qwen3DenseConfig:
    """XTuner's config of a Hugging Face Qwen3 folder; eager attention runs on CPU, flash_attention needs a GPU."""
    config = Qwen3DenseConfig.from_hf(str(llm_dir))
    attention = config.attention.model_copy(update={"attn_impl": attn_impl})
    return config.model_copy(update={"attention": attention, "compile_cfg": None if compile_model else False})


class TimeSeriesModel(BaseModel):
    def __init__(self, config: TimeSeriesModelConfig):
        super().__init__(config)
        from transformers import AutoConfig, AutoModel

        encoder_config = AutoConfig.from_pretrained(config.encoder_path)
        self.encoder = AutoModel.from_config(encoder_config)
        width = encoder_config.hidden_size * config.channels
        hidden = config.text_config.hidden_size
        self.projector = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.language_model = config.text_config.build()
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)
        if config.freeze_language:
            self.language_model.requires_grad_(False)
        self._init_load_spec()

    # --- forward ----------------------------------------------------------------------------------

    def encode(self, signals: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """[N, T, C] padded signals → [N, F, C*H] projected frames (F = frames of the longest signal)."""
        count, length, channels = signals.shape
        mono = signals.permute(0, 2, 1).reshape(count * channels, length)
        mask = (torch.arange(length, device=signals.device)[None, :] < frames.repeat_interleave(channels)[:, None]).long()
        hidden = self.encoder(input_values=mono.to(self._encoder_dtype()), attention_mask=mask).last_hidden_state
        hidden = hidden.reshape(count, channels, hidden.shape[1], hidden.shape[2]).permute(0, 2, 1, 3)
        return self.projector(hidden.reshape(count, hidden.shape[1], -1).to(self._projector_dtype()))

    def _encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def _projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def _embeddings(self, seq_ctx: TimeSeriesSequenceContext) -> torch.Tensor:
        input_ids = seq_ctx.input_ids
        embeds = self.language_model.embed_tokens(input_ids)
        positions = input_ids == self.config.ts_token_id
        if seq_ctx.num_signals:
            features = self.encode(seq_ctx.time_series, seq_ctx.ts_frames)
            wanted = [features[i, : int(n)] for i, n in enumerate(seq_ctx.ts_num_tokens)]
            if any(part.shape[0] != int(n) for part, n in zip(wanted, seq_ctx.ts_num_tokens, strict=True)):
                raise ValueError(f"the encoder gave {features.shape[1]} frames for the longest signal, fewer than the "
                                 f"{int(seq_ctx.ts_num_tokens.max())} <TS_CONTEXT> tokens the tokenizer planned")
            flat = torch.cat(wanted).to(embeds.dtype)
            if flat.shape[0] != int(positions.sum()):
                raise ValueError(f"{int(positions.sum())} <TS_CONTEXT> positions but {flat.shape[0]} signal frames; "
                                 "the cache and the model disagree (rebuild the cache with this encoder)")
            embeds = embeds.masked_scatter(positions[..., None], flat)
        else:
            if bool(positions.any()):
                raise ValueError("<TS_CONTEXT> tokens without signals in the batch")
            dummy = torch.zeros(1, 256, self.config.channels, device=embeds.device)
            idle = self.encode(dummy, torch.tensor([256], device=embeds.device))
            embeds = embeds + idle.sum() * 0.0
        return embeds

    def forward(self, seq_ctx: TimeSeriesSequenceContext, loss_ctx: dict | None = None) -> ModelOutputs:
        if seq_ctx.ts_token_id is not None and seq_ctx.ts_token_id != self.config.ts_token_id:
            raise ValueError(f"the batch marks signals with id {seq_ctx.ts_token_id}, the model expects {self.config.ts_token_id}")
        lang_ctx = seq_ctx.copy(input_ids=None, inputs_embeds=self._embeddings(seq_ctx))
        return self.language_model(lang_ctx, loss_ctx)

    def build_loss_ctx_batch(self, data_batch: list[dict], sp_mesh=None) -> list[dict]:
        return self.language_model.build_loss_ctx_batch(data_batch, sp_mesh=sp_mesh)

    def post_micro_batch_forward(self, batch_outputs):
        return self.language_model.post_micro_batch_forward(batch_outputs)

    def init_weights(self) -> None:
        self.language_model.init_weights()

    def fully_shard(self, fsdp_config):
        """XTuner's Trainer builds the model on the meta device, then shards: materialise the encoder and projector too."""
        super().fully_shard(fsdp_config)
        self._to_empty_meta()
        return self

    def _load_module(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """A full state dict into a plain or FSDP-sharded module."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
        else:
            module.load_state_dict(state)

    def _full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return module.state_dict()

    # --- checkpoints --------------------------------------------------------------------------------

    def from_hf(self, hf_path: str | Path, strict: bool = True) -> tuple[set[str], set[str], set[str]]:
        """Load encoder/, llm/ and projector.safetensors from a saved folder (a base folder may lack the projector)."""
        path = Path(hf_path)
        self._hf_path = path
        from transformers import AutoModel

        encoder_state = AutoModel.from_pretrained(str(path / "encoder")).state_dict()
        self._load_module(self.encoder, encoder_state)
        loaded = {f"encoder.{k}" for k in encoder_state}
        missing: set[str] = set()
        if get_device() == "cpu":
            loaded |= _load_language_model(self.language_model, path / "llm")
        else:
            got, _, lost = self.language_model.from_hf(str(path / "llm"), strict=strict)
            loaded |= {f"language_model.{k}" for k in got}
            missing |= {f"language_model.{k}" for k in lost}
        if (path / PROJECTOR_FILE).exists():
            self._load_module(self.projector, load_file(str(path / PROJECTOR_FILE)))
            loaded |= {f"projector.{k}" for k in self.projector.state_dict()}
        else:
            missing |= {f"projector.{k}" for k in self.projector.state_dict()}
            if strict:
                raise RuntimeError(f"{path / PROJECTOR_FILE} is missing; pass strict=False to start from a fresh projector")
        return loaded, set(), missing

    def save_hf(self, hf_dir: str | Path, save_dtype: torch.dtype = torch.float32, safetensors_prefix: str = "model") -> None:
        """Write the folder described in the module docstring."""
        import torch.distributed as dist

        out = Path(hf_dir)
        out.mkdir(parents=True, exist_ok=True)
        encoder_state, projector_state = self._full_state(self.encoder), self._full_state(self.projector)
        if get_device() == "cpu":
            _save_language_model(self.language_model, out / "llm", save_dtype)
        else:
            self.language_model.save_hf(out / "llm", save_dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        self.encoder.save_pretrained(str(out / "encoder"), state_dict={k: v.to(save_dtype) for k, v in encoder_state.items()},
                                     safe_serialization=True)
        save_file({k: v.detach().to(save_dtype).contiguous().cpu() for k, v in projector_state.items()}, str(out / PROJECTOR_FILE))
        write_base_files(out, self.config.ts_token_id, self.config.channels, self.config.target_rate)


def write_base_files(folder: Path, ts_token_id: int, channels: int, target_rate: float) -> None:
    """timeseries.json, and the language model's config.json at the top so that tools (XTuner's is_hf_model_path)
    recognise the folder as a Hugging Face model."""
    meta = {"ts_token_id": ts_token_id, "channels": channels, "target_rate": target_rate, "encoder": "encoder", "llm": "llm"}
    (folder / MODEL_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copyfile(folder / "llm" / "config.json", folder / "config.json")


def _hf_key(model, name: str) -> str:
    keys = model.to_hf_key_list(name)
    if len(keys) != 1:
        raise NotImplementedError(f"{name} maps to {len(keys)} checkpoint tensors; only one-to-one layouts load on CPU")
    return keys[0]


def _load_language_model(model, llm_dir: Path) -> set[str]:
    """XTuner's from_hf needs an accelerator (it profiles accelerator memory); on CPU map keys one to one."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(llm_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    loaded = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = _hf_key(model, name)
            if key not in tensors:
                raise ValueError(f"{llm_dir}: no tensor {key} for parameter {name}; the llm folder does not match the model config")
            param.copy_(tensors[key].to(param.dtype))
            loaded.add(f"language_model.{name}")
    return loaded


def _save_language_model(model, llm_dir: Path, dtype: torch.dtype) -> None:
    llm_dir.mkdir(parents=True, exist_ok=True)
    state = {_hf_key(model, name): param.detach().to(dtype).contiguous().cpu() for name, param in model.named_parameters()}
    save_file(state, str(llm_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.hf_config
    config.rope_parameters = {k: v for k, v in config.rope_parameters.items() if v is not None}
    config.dtype = dtype
    config.save_pretrained(str(llm_dir))


def load_model(folder: str | Path, *, llm_dir: str | Path | None = None, attn_impl: str = "eager_attention",
               strict: bool = True, ts_token_id: int | None = None, channels: int = 1, target_rate: float = 50.0) -> TimeSeriesModel:
    """Build a TimeSeriesModel for a saved folder (or a base folder with encoder/ and llm/) and load its weights."""
    folder = Path(folder)
    meta = json.loads((folder / MODEL_FILE).read_text()) if (folder / MODEL_FILE).exists() else {}
    token = meta.get("ts_token_id", ts_token_id)
    if token is None:
        raise ValueError(f"{folder} has no {MODEL_FILE}; pass ts_token_id")
    config = TimeSeriesModelConfig(
        encoder_path=str(folder / "encoder"), text_config=text_config_from(llm_dir or folder / "llm", attn_impl),
        ts_token_id=token, channels=meta.get("channels", channels), target_rate=meta.get("target_rate", target_rate),
    )
    model = config.build()
    model.from_hf(folder, strict=strict)
    return model
