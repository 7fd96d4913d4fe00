import hashlib

from transformers import AutoProcessor

from visionqc.demo.model import ADDED_TOKENS, FIRST_ADDED_ID, IMAGE_TOKEN_ID, build_demo_model, build_tokenizer


def test_tokenizer_round_trip_and_special_ids():
    tokenizer = build_tokenizer()
    assert tokenizer.encode("你好 world") == [108386, 1879]
    text = "BBU×2，标签×3 {\"bbox_2d\": [12, 300, 998, 1000]} <|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for offset, (token, _) in enumerate(ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == FIRST_ADDED_ID + offset
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == IMAGE_TOKEN_ID == 151655
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643
    assert tokenizer.encode("<|im_start|>user") == [151644, 872]


def test_processor_loads_and_renders_images(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    messages = [{"role": "user", "content": [{"type": "image", "image": "x.jpg"}, {"type": "text", "text": "数一数"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>数一数<|im_end|>\n<|im_start|>assistant\n"


def test_same_seed_same_weights(tiny_model, tmp_path):
    build_demo_model(tmp_path / "again", seed=0)
    build_demo_model(tmp_path / "other", seed=1)
    def digest(folder):
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert digest(tmp_path / "again") == digest(tiny_model) != digest(tmp_path / "other")
