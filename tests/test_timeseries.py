"""The time-series modality on the real XTuner V1 classes: tokenize, cache, collate, model, trainer config, CPU loop, eval."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visionqc.arrow_cache import CacheRef
from visionqc.io import read_jsonl
from visionqc.timeseries.cache import (
    TimeSeriesCacheOptions,
    build_ts_cache,
    tokenize_function,
)
from visionqc.timeseries.collate import (
    COLLATOR,
    TimeSeriesSequenceContext,
    time_series_collator,
)
from visionqc.timeseries.dataset import TimeSeriesCacheDataset
from visionqc.timeseries.model import MODEL_FILE, load_model
from visionqc.timeseries.tokenize import TS_CONTEXT, TS_END, TS_START, EncoderGeometry

from conftest import convert_into, write_demo_signals


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from visionqc.demo.ts_models import build_demo_ts_models

    out = tmp_path_factory.mktemp("ts_models") / "base"
    build_demo_ts_models(out, seed=0)
    return out


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """20 converted demo traces (16 train, 4 val) and one pure-text record appended to train."""
    root = tmp_path_factory.mktemp("ts_data")
    write_demo_signals(root / "export", seed=2, count=20)
    convert_into("signals", root / "export/manifest.csv", root / "conv", {"val_fraction": 0.2, "seed": 1})
    with open(root / "conv/train.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "正常是什么意思？"},
                                              {"role": "assistant", "content": "没有异常"}]}, ensure_ascii=False) + "\n")
    return root / "conv"


def function(records, base, **changes):
    options = TimeSeriesCacheOptions(**changes)
    return tokenize_function(records / "train.jsonl", base / "llm", base / "encoder", options)


def rows(path):
    return [record for _, record in read_jsonl(path)]


def test_placeholders_expand_to_the_encoder_frames(records, base):
    from transformers import AutoModel

    fn = function(records, base)
    encoder = AutoModel.from_pretrained(str(base / "encoder")).eval()
    for record in rows(records / "train.jsonl")[:6]:
        item = fn(record)
        (signal,) = item["time_series"]
        (tokens,) = item["ts_num_tokens"]
        with torch.no_grad():
            frames = encoder(torch.as_tensor(signal[:, 0])[None]).last_hidden_state.shape[1]
        assert tokens == frames == int(encoder._get_feat_extract_output_lengths(torch.tensor(signal.shape[0])))
        ids = item["input_ids"]
        start = ids.index(fn.ids[TS_START])
        assert ids[start + 1 : start + 1 + tokens] == [fn.ids[TS_CONTEXT]] * tokens
        assert ids[start + 1 + tokens] == fn.ids[TS_END]
        assert ids.count(fn.ids[TS_CONTEXT]) == tokens
        assert item["num_tokens"] == len(ids) == len(item["labels"])
        assert abs(float(signal.mean())) < 1e-4 and abs(float(signal.std()) - 1) < 1e-3  # normalised


def test_labels_cover_the_answer_only(records, base):
    fn = function(records, base)
    record = rows(records / "train.jsonl")[0]
    item = fn(record)
    labelled = [t for t in item["labels"] if t != -100]
    assert fn.tokenizer.decode(labelled) == record["messages"][1]["content"] + "<|im_end|>"
    text = fn.tokenizer.decode(item["input_ids"])
    assert text.startswith("<|im_start|>user\n<|ts|><TS_CONTEXT>") and text.endswith("<|im_start|>assistant\n" + record["messages"][1]["content"] + "<|im_end|>")


def test_pure_text_goes_through_the_same_function(records, base):
    fn = function(records, base)
    item = fn(rows(records / "train.jsonl")[-1])
    assert item["time_series"] == [] and item["ts_num_tokens"] == []
    assert fn.tokenizer.decode([t for t in item["labels"] if t != -100]) == "没有异常<|im_end|>"


def test_cache_state_counts_tokens_without_loading_signals(records, base):
    fn = function(records, base)
    record = rows(records / "train.jsonl")[3]
    full = fn(record)
    fn.set_state("cache")
    counted = fn(record)
    assert counted["num_tokens"] == full["num_tokens"] and "input_ids" not in counted and "proxy_attn_flops" in counted


def test_hash_follows_everything_that_changes_the_output(records, base):
    reference = function(records, base).hash()
    assert function(records, base).hash() == reference
    assert function(records, base, target_rate=25).hash() != reference
    assert function(records, base, channels=2).hash() != reference
    other = function(records, base)
    other.geometry = EncoderGeometry((8, 4), (4, 4))
    assert other.hash() != reference
    other = function(records, base)
    other.tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]}, replace_extra_special_tokens=False)
    other._tokenizer_hash = None
    assert other.hash() != reference


def test_geometry_matches_wav2vec2_lengths(base):
    from transformers import AutoConfig, AutoModel

    geometry = EncoderGeometry.from_config(AutoConfig.from_pretrained(str(base / "encoder")))
    encoder = AutoModel.from_pretrained(str(base / "encoder"))
    lengths = torch.arange(1, 900)
    assert [geometry.frames(int(n)) for n in lengths] == [max(0, int(n)) for n in encoder._get_feat_extract_output_lengths(lengths)]
    assert geometry.frames(geometry.min_samples()) == 1 and geometry.frames(geometry.min_samples() - 1) == 0
    with pytest.raises(ValueError, match="conv_kernel/conv_stride"):
        EncoderGeometry.from_config(AutoConfig.from_pretrained(str(base / "llm")))


def test_cached_tokens_equal_a_fresh_call(records, base, tmp_path):
    manifest = build_ts_cache(records / "train.jsonl", base, tmp_path / "cache", tmp_path / "train.json").report
    assert not manifest["reused"] and manifest["signals"] == 16 and manifest["lengths"]["samples"] == 17
    assert manifest["answers"] == sorted({"正常", "尖峰", "掉电", "漂移", "没有异常"})
    dataset = TimeSeriesCacheDataset.read(CacheRef.read(tmp_path / "train.json"))
    fn = function(records, base)
    for index, record in enumerate(rows(records / "train.jsonl")):
        fresh, cached = fn(record), dataset[index]
        for key in ("input_ids", "labels", "num_tokens", "ts_frames", "ts_num_tokens", "ts_sampling_rates", "ts_urls"):
            assert list(cached[key]) == list(fresh[key]) if isinstance(fresh[key], list) else cached[key] == fresh[key], key
        for a, b in zip(cached["time_series"], fresh["time_series"], strict=True):
            assert np.array_equal(a, b)
    again = build_ts_cache(records / "train.jsonl", base, tmp_path / "cache", tmp_path / "again.json").report
    assert again["reused"] and again["key"] == manifest["key"]


def test_a_changed_signal_file_changes_the_cache_key(records, base, tmp_path):
    copy = tmp_path / "conv"
    import shutil

    shutil.copytree(records, copy)
    first = build_ts_cache(copy / "val.jsonl", base, tmp_path / "cache", tmp_path / "p.json").report
    url = rows(copy / "val.jsonl")[0]["messages"][0]["content"][0]["time_series_url"]["url"]
    signal = copy / url
    data = bytearray(signal.read_bytes())
    data[-4:] = np.float32(0.5).tobytes()
    signal.unlink()  # a hard link to the export: replace, do not write through
    signal.write_bytes(bytes(data))
    second = build_ts_cache(copy / "val.jsonl", base, tmp_path / "cache", tmp_path / "p.json").report
    assert second["key"] != first["key"] and not second["reused"]


def test_over_length_records_stop_the_cache_with_their_lines(records, base, tmp_path):
    with pytest.raises(ValueError, match=r"exceed timeseries.max_length=20:\n  .*train\.jsonl:1: \d+ tokens"):
        build_ts_cache(records / "train.jsonl", base, tmp_path / "c", tmp_path / "p.json", {"max_length": 20})


def test_a_config_rate_the_base_was_not_built_for_is_refused(records, base, tmp_path):
    with pytest.raises(ValueError, match=r"timeseries.target_rate is 100.*built for 50"):
        build_ts_cache(records / "train.jsonl", base, tmp_path / "c", tmp_path / "p.json", {"target_rate": 100})


def test_collator_packs_with_xtuners_build_text_ctx_labels(records, base):
    from xtuner.v1.datasets.config import DataloaderConfig

    fn = function(records, base)
    items = [fn(record) for record in rows(records / "train.jsonl")[:3]] + [fn(rows(records / "train.jsonl")[-1])]
    (collated,) = time_series_collator([items], pack_max_length=4096, padding_token_idx=151643, pack_to_max_length=True)
    ctx = collated["seq_ctx"]
    assert isinstance(ctx, TimeSeriesSequenceContext)
    total = sum(item["num_tokens"] for item in items)
    assert ctx.input_ids.shape == (1, 4096) and ctx.num_padding == 4096 - (total - 1)
    assert ctx.input_ids[0, : total - 1].tolist() == [t for item in items for t in item["input_ids"]][:-1]
    assert collated["shifted_labels"][0, : total - 1].tolist() == [t for item in items for t in item["labels"]][1:]
    assert ctx.cu_seq_lens_q[: len(items) + 1].tolist() == [0] + np.cumsum([i["num_tokens"] for i in items[:-1]] + [items[-1]["num_tokens"] - 1]).tolist()
    assert ctx.time_series.shape == (3, max(f for i in items for f in i["ts_frames"]), 1)
    assert ctx.ts_num_tokens.tolist() == [n for i in items for n in i["ts_num_tokens"]]
    assert ctx.ts_token_id == fn.ids[TS_CONTEXT] and ctx.num_signals == 3
    assert torch.equal(ctx.time_series[1, : items[1]["ts_frames"][0]], torch.as_tensor(items[1]["time_series"][0]))
    moved = ctx.copy(input_ids=ctx.input_ids.clone())
    assert isinstance(moved, TimeSeriesSequenceContext) and moved.time_series is ctx.time_series
    config = DataloaderConfig(collator=COLLATOR, pack_level="none", group_by_length=False)
    assert config.build_collator() is time_series_collator


def test_forward_backward_reaches_every_part_and_pure_text_keeps_the_encoder(records, base):
    fn = function(records, base)
    torch.manual_seed(0)
    model = load_model(base, strict=False)
    for items in ([fn(r) for r in rows(records / "train.jsonl")[:2]], [fn(rows(records / "train.jsonl")[-1])]):
        (batch,) = time_series_collator([items], pack_max_length=1024, padding_token_idx=0, pack_to_max_length=False)
        model.zero_grad(set_to_none=True)
        loss_ctx = model.build_loss_ctx_batch([batch])[0]
        loss = model(seq_ctx=batch["seq_ctx"], loss_ctx=loss_ctx)["loss"]
        assert torch.isfinite(loss) and loss.item() > 1
        loss.backward()
        for part in (model.encoder, model.projector, model.language_model):
            grads = [p.grad for p in part.parameters() if p.requires_grad]
            assert grads and all(g is not None for g in grads), type(part).__name__
        encoder_signal = sum(float(p.grad.abs().sum()) for p in model.encoder.parameters())
        assert (encoder_signal > 0) == bool(items[0]["ts_frames"])  # pure text: in the graph, but zero gradient


def test_saved_model_loads_back_with_identical_outputs(records, base, tmp_path):
    fn = function(records, base)
    torch.manual_seed(1)
    model = load_model(base, strict=False).eval()
    with pytest.raises(RuntimeError, match=r"projector\.safetensors is missing"):
        load_model(base)
    model.save_hf(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / MODEL_FILE).read_text())["ts_token_id"] == fn.ids[TS_CONTEXT]
    reloaded = load_model(tmp_path / "saved").eval()
    (batch,) = time_series_collator([[fn(r) for r in rows(records / "train.jsonl")[:3]]], pack_max_length=1024,
                                    padding_token_idx=0, pack_to_max_length=False)
    with torch.no_grad():
        first = model(seq_ctx=batch["seq_ctx"], loss_ctx=None)["logits"]
        second = reloaded(seq_ctx=batch["seq_ctx"], loss_ctx=None)["logits"]
    assert torch.equal(first, second)
    from transformers import AutoModel, AutoModelForCausalLM

    assert AutoModel.from_pretrained(str(tmp_path / "saved" / "encoder")) is not None
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved" / "llm")).config.vocab_size == 151936


def test_trainer_config_validates_with_xtuner(records, base, tmp_path):
    from xtuner.v1.train.trainer import TrainerConfig
    from xtuner.v1.utils.misc import is_hf_model_path

    from visionqc.timeseries.train import (
        TimeSeriesTrainOptions,
        load_trainer_config,
        write_trainer_config,
    )

    opts = TimeSeriesTrainOptions(steps=7, learning_rate=1e-3, save_every=3)
    path = write_trainer_config(tmp_path / "trainer_config.py", base=base, train_records=records / "train.jsonl",
                                work_dir=tmp_path / "work", opts=opts, target_rate=50, channels=1, max_length=512,
                                ts_token_id=151670)
    trainer = load_trainer_config(path)
    assert isinstance(trainer, TrainerConfig)
    assert trainer.total_step == 7 and trainer.auto_resume and Path(trainer.work_dir) == (tmp_path / "work").resolve()
    assert trainer.optim_cfg.lr == 1e-3 and trainer.checkpoint_interval == 3
    assert trainer.dataloader_cfg.collator == COLLATOR and trainer.dataloader_cfg.build_collator() is time_series_collator
    (entry,) = trainer.dataloader_cfg.dataset_config_list
    assert Path(entry["dataset"].anno_path) == (records / "train.jsonl").resolve()
    built = entry["tokenize_fn"].build(function(records, base).tokenizer)
    assert built.hash() == function(records, base).hash()  # XTuner tokenizes exactly as cache_ts did
    assert trainer.model_cfg.ts_token_id == 151670 and trainer.model_cfg.text_config.attention.attn_impl == "flash_attention"
    assert is_hf_model_path(str(base))[0] and str(trainer.load_from) == str(base.resolve())


@pytest.fixture(scope="module")
def caches(records, base, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ts_caches")
    for split in ("train", "val"):
        build_ts_cache(records / f"{split}.jsonl", base, root / "cache", root / f"{split}.json")
    return {"train": root / "train.json", "val": root / "val.json"}


def test_a_few_cpu_steps_lower_the_loss_and_a_rerun_resumes(base, caches, records, tmp_path):
    from visionqc.timeseries.train import train_ts

    options = {"backend": "loop", "device": "cpu", "steps": 12, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 0,
               "save_every": 6, "seed": 3}

    def train_into(out, val_cache, on_step=None):
        outputs = {"model_out": out / "model", "summary_out": out / "summary.json", "trainer_config_out": out / "trainer_config.py",
                   "loss_plot": out / "loss.png", "history_out": out / "history.jsonl", "work_dir": out}
        summary = train_ts(base, caches["train"], val_cache, records / "train.jsonl", **outputs, options=options, on_step=on_step).report
        return {**summary, "history": [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]}

    summary = train_into(tmp_path / "a", caches["val"])
    losses = [h["loss"] for h in summary["history"]]
    assert summary["backend"] == "loop" and len(losses) == 12
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert summary["eval_loss"] is not None and summary["eval_loss"] < summary["history"][0]["loss"]
    assert (tmp_path / "a/model" / MODEL_FILE).exists() and (tmp_path / "a/loss.png").exists()
    assert (tmp_path / "a/trainer_config.py").exists()

    class Stop(Exception):
        pass

    def stop_after_seven(entry):
        if entry["step"] == 7:
            raise Stop

    with pytest.raises(Stop):
        train_into(tmp_path / "b", caches["val"], on_step=stop_after_seven)
    resumed = train_into(tmp_path / "b", caches["val"])
    assert resumed["steps_run_now"] == 6
    assert [h["loss"] for h in resumed["history"]] == losses  # the same bytes of history as the uninterrupted run

    # a last.pt cut short (here: rewritten without its tail) is skipped for previous.pt, which was saved at step 6
    checkpoints = tmp_path / "b" / "checkpoints"
    (checkpoints / "last.pt").write_bytes((checkpoints / "last.pt").read_bytes()[:-100])
    logged = []
    again = train_ts(base, caches["train"], caches["val"], records / "train.jsonl", model_out=tmp_path / "b/model",
                     summary_out=tmp_path / "b/summary.json", trainer_config_out=tmp_path / "b/trainer_config.py",
                     loss_plot=tmp_path / "b/loss.png", history_out=tmp_path / "b/history.jsonl", work_dir=tmp_path / "b",
                     options=options, log=logged.append).report
    assert any(line.startswith(f"skipped checkpoint {checkpoints / 'last.pt'}: last.pt is cut short") for line in logged)
    assert again["steps_run_now"] == 6
    other_inputs = train_into(tmp_path / "b", None)
    assert other_inputs["steps_run_now"] == 12  # a checkpoint of other inputs is not resumed


def test_ranking_scores_equal_single_forward_log_likelihoods(base, caches, tmp_path):
    from visionqc.timeseries.evaluate import (
        answer_log_likelihoods,
        evaluate_ts,
        with_answer,
    )

    torch.manual_seed(2)
    model = load_model(base, strict=False).eval()
    model.save_hf(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "model/llm" / name).write_bytes((base / "llm" / name).read_bytes())
    dataset = TimeSeriesCacheDataset.read(CacheRef.read(caches["val"]))
    items = [with_answer(dataset[i], ids) for i in range(2) for ids in ([56568, 151645], [99180, 151645])]
    packed = answer_log_likelihoods(model, items, "cpu")
    alone = [answer_log_likelihoods(model, [item], "cpu")[0] for item in items]
    assert np.allclose(packed, alone, atol=1e-4)
    metrics = evaluate_ts(tmp_path / "model", caches["val"], caches["train"], metrics_out=tmp_path / "eval/metrics.json",
                          predictions_out=tmp_path / "eval/predictions.jsonl", confusion_out=tmp_path / "eval/confusion.png",
                          options={"device": "cpu"}).report
    assert (tmp_path / "eval/confusion.png").stat().st_size > 1000
    assert metrics["records"] == 4 and metrics["chance"] == 0.2
    assert sum(metrics["confusion"].values()) == 4
    predictions = [json.loads(line) for line in (tmp_path / "eval/predictions.jsonl").read_text().splitlines()]
    assert metrics["accuracy"] == pytest.approx(sum(p["predicted"] == p["answer"] for p in predictions) / 4, abs=1e-4)
    for prediction in predictions:
        assert prediction["predicted"] == max(prediction["log_likelihoods"], key=prediction["log_likelihoods"].get)
