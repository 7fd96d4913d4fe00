"""The tiny, seeded base models of the time-series branch, built offline.

encoder/  a Wav2Vec2Model built from a config (a convolutional front end over raw samples, then a
          small transformer), saved with save_pretrained; AutoModel loads it back.
llm/      a Qwen3ForCausalLM in Hugging Face format with the real Qwen tokenizer plus the
          time-series tokens <|ts|>, <TS_CONTEXT>, <|/ts|>; XTuner's Qwen3Dense loads it with from_hf.
"""

from __future__ import annotations

from pathlib import Path

from visionqc.demo.model import TINY_SIZES, VOCAB_SIZE, build_tokenizer

ENCODER_SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [32, 32, 32],
    "conv_kernel": [8, 4, 4],  # 32 samples per frame: 50 Hz traces of 6-12 s give 8-17 frames
    "conv_stride": [4, 4, 2],
}
# The vision demo's text sizes (2 layers, hidden 64, head_dim 16, warm embedding std 0.25).
LLM_SIZES = {key: TINY_SIZES[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "embedding_std")}


def build_demo_encoder(out_dir: str | Path, seed: int = 0, sizes: dict | None = None) -> dict:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from visionqc.io import atomic_directory

    s = {**ENCODER_SIZES, **(sizes or {})}
    config = Wav2Vec2Config(
        hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        intermediate_size=s["intermediate_size"], conv_dim=s["conv_dim"], conv_kernel=s["conv_kernel"], conv_stride=s["conv_stride"],
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True,
        mask_time_prob=0.0, mask_feature_prob=0.0, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, vocab_size=4,
    )
    torch.manual_seed(seed)
    model = Wav2Vec2Model(config).to(torch.float32).eval()
    with atomic_directory(out_dir) as work:
        model.save_pretrained(work, safe_serialization=True)
    return {"parameters": sum(p.numel() for p in model.parameters()), **s}


def build_demo_llm(out_dir: str | Path, seed: int = 0, sizes: dict | None = None) -> dict:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from visionqc.io import atomic_directory
    from visionqc.timeseries.tokenize import add_time_series_tokens

    s = {**LLM_SIZES, **(sizes or {})}
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], head_dim=s["head_dim"], max_position_embeddings=2048,
        max_window_layers=s["num_hidden_layers"], rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.mul_(s["embedding_std"] / embedding.std())
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, bos_token_id=151643)
    tokenizer = build_tokenizer()
    ids = add_time_series_tokens(tokenizer)
    with atomic_directory(out_dir) as work:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
    return {"parameters": sum(p.numel() for p in model.parameters()), "ts_token_ids": ids, **s}


def build_demo_ts_models(out_dir: str | Path, seed: int = 0, encoder: dict | None = None, llm: dict | None = None,
                         channels: int = 1, target_rate: float = 50.0) -> dict:
    """Write a base folder (encoder/, llm/, timeseries.json, config.json) that TimeSeriesModel.from_hf reads."""
    from visionqc.io import atomic_directory
    from visionqc.timeseries.model import write_base_files

    with atomic_directory(out_dir) as work:
        facts = {"encoder": build_demo_encoder(work / "encoder", seed, encoder), "llm": build_demo_llm(work / "llm", seed, llm)}
        write_base_files(work, facts["llm"]["ts_token_ids"]["<TS_CONTEXT>"], channels, target_rate)
    return facts
