"""Sensor traces: reading the four formats, resampling, the demo generator, manifest conversion and signal rejects."""

import json
import sys

import numpy as np
import pytest
import soundfile

from visionqc import contract
from visionqc.demo.signals import ANSWERS
from visionqc.io import read_jsonl
from visionqc.signals import read_header, read_signal, resample, resampled_length
from visionqc.timeseries import require_xtuner
from visionqc.validate import validate

from conftest import convert_into, write_demo_signals

BOUNDS = {"sampling_rate": [10, 1000], "channels": [1, 1], "seconds": [2, 60]}


def wave(frames=400, channels=1, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)


def test_the_four_formats_read_the_same_samples(tmp_path):
    samples = wave(300, 2)
    soundfile.write(tmp_path / "a.wav", samples, 100, subtype="FLOAT")
    soundfile.write(tmp_path / "a.flac", samples, 100, subtype="PCM_24")
    np.save(tmp_path / "a.npy", samples)
    np.savetxt(tmp_path / "a.csv", samples, delimiter=",", header="left,right", comments="", fmt="%.9g")
    for name, tolerance, rate in (("a.wav", 0, 100.0), ("a.flac", 1e-6, 100.0), ("a.npy", 0, None), ("a.csv", 1e-7, None)):
        read, header_rate = read_signal(tmp_path / name)
        assert read.shape == (300, 2), name
        assert np.abs(read - samples).max() <= tolerance, name
        assert header_rate == rate, name
        assert (read_header(tmp_path / name).frames, read_header(tmp_path / name).channels) == (300, 2)


@pytest.mark.parametrize(("frames", "rate", "target"), [(1000, 100, 50), (999, 200, 50), (333, 44.1, 50), (500, 50, 100), (700, 50, 50)])
def test_resample_length_is_known_before_resampling(frames, rate, target):
    out = resample(wave(frames), rate, target)
    assert out.shape == (resampled_length(frames, rate, target), 1)
    assert abs(out.shape[0] - frames * target / rate) < 1


def test_resample_keeps_a_slow_sine():
    t = np.arange(2000) / 200
    slow = np.sin(2 * np.pi * 0.5 * t)[:, None].astype(np.float32)
    out = resample(slow, 200, 50)
    expected = np.sin(2 * np.pi * 0.5 * np.arange(out.shape[0]) / 50)
    assert np.abs(out[50:-50, 0] - expected[50:-50]).max() < 0.01


def test_demo_signals_are_seeded_and_balanced(tmp_path):
    write_demo_signals(tmp_path / "a", seed=3, count=12)
    write_demo_signals(tmp_path / "b", seed=3, count=12)
    write_demo_signals(tmp_path / "c", seed=4, count=12)
    first = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(first) == 13
    for rel in first:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a/traces/00000.wav").read_bytes() != (tmp_path / "c/traces/00000.wav").read_bytes()
    rows = (tmp_path / "a/manifest.csv").read_text().splitlines()
    assert rows[0] == "path,sampling_rate,channels,label,answer"
    labels = [row.split(",")[3] for row in rows[1:]]
    assert {label: labels.count(label) for label in set(labels)} == dict.fromkeys(ANSWERS.values(), 3)


def test_demo_classes_differ_where_they_should(tmp_path):
    from visionqc.demo.signals import trace

    rng = np.random.default_rng(0)
    normal, spike, dropout, drift = (trace(rng, label, 100, 10.0) for label in ("normal", "spike", "dropout", "drift"))
    assert spike.max() - np.median(spike) > 0.3 > normal.max() - np.median(normal)
    assert (np.abs(dropout) < 0.03).sum() >= 200 and (np.abs(normal) < 0.03).sum() == 0
    assert abs(drift[-100:].mean() - drift[:100].mean()) > 0.2 > abs(normal[-100:].mean() - normal[:100].mean())


def test_manifest_converts_to_time_series_records(tmp_path):
    write_demo_signals(tmp_path / "export", seed=1, count=20)
    options = {"val_fraction": 0.25, "seed": 5, "signals": {"prompt": "这段曲线是什么情况？"}}
    report = convert_into("signals", tmp_path / "export/manifest.csv", tmp_path / "out", options)
    assert report["records"] == {"train": 15, "val": 5}
    assert report["labels"] == dict.fromkeys(ANSWERS.values(), 5)
    assert report["issues"] == []
    assert (tmp_path / "out/overlays/traces.png").stat().st_size > 10_000
    records = [r for _, r in read_jsonl(tmp_path / "out/train.jsonl")] + [r for _, r in read_jsonl(tmp_path / "out/val.jsonl")]
    first = min(records, key=lambda r: int(r["metadata"]["source"].rsplit(":", 1)[1]))
    (where, signal), = contract.time_series_parts(first)
    assert where == "messages[0].content[0].time_series_url"
    assert signal["url"] == "signals/traces/00000.wav" and signal["channels"] == 1
    assert first["messages"][0]["content"][1] == {"type": "text", "text": "<TS_CONTEXT>\n这段曲线是什么情况？"}
    assert first["messages"][1] == {"role": "assistant", "content": ANSWERS["normal"]}
    assert first["metadata"] == {"source": f"{tmp_path / 'export/manifest.csv'}:2", "label": "正常"}
    copied, rate = read_signal(tmp_path / "out" / signal["url"])
    assert rate == signal["sampling_rate"]
    assert np.array_equal(copied, read_signal(tmp_path / "export/traces/00000.wav")[0])
    again = convert_into("signals", tmp_path / "export/manifest.csv", tmp_path / "again", options)
    assert again["records"] == report["records"]
    assert (tmp_path / "again/train.jsonl").read_bytes() == (tmp_path / "out/train.jsonl").read_bytes()


def test_jsonl_manifest_and_rate_from_the_wav_header(tmp_path):
    soundfile.write(tmp_path / "t.wav", wave(400), 80, subtype="FLOAT")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "t.wav", "answer": "正常", "prompt": "看<TS_CONTEXT>这条"}) + "\n")
    convert_into("signals", tmp_path / "m.jsonl", tmp_path / "out", {"val_fraction": 0})
    (_, record), = read_jsonl(tmp_path / "out/train.jsonl")
    assert record["messages"][0]["content"][0]["time_series_url"] == {"url": "signals/t.wav", "sampling_rate": 80}
    assert record["messages"][0]["content"][1]["text"] == "看<TS_CONTEXT>这条"
    assert contract.check_record(record) == ([], [])


def bad_manifest(root):
    """One good trace and one row per reject reason; returns {manifest line: (reason, field suffix)}."""
    root.mkdir()
    soundfile.write(root / "good.wav", wave(400), 100, subtype="FLOAT")
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    with_nan = wave(400)
    with_nan[123, 0] = np.nan
    np.save(root / "nan.npy", with_nan)
    np.save(root / "plain.npy", wave(400, seed=1))
    np.savetxt(root / "stereo.csv", wave(400, 2, seed=2), delimiter=",")
    soundfile.write(root / "short.wav", wave(50, seed=3), 100, subtype="FLOAT")
    soundfile.write(root / "long.wav", wave(7000, seed=4), 100, subtype="FLOAT")
    np.save(root.parent / "outside.npy", wave(400, seed=5))
    rows = [
        ("good.wav", "100", "1", "", None),
        ("broken.wav", "100", "", "", ("unreadable_signal", "url")),
        ("nan.npy", "100", "", "", ("non_finite_samples", "url")),
        ("plain.npy", "0", "", "", ("out_of_range", "sampling_rate")),
        ("plain.npy", "", "", "", ("missing_key", "sampling_rate")),
        ("plain.npy", "5", "", "", ("sampling_rate_out_of_range", "sampling_rate")),
        ("stereo.csv", "100", "", "", ("channels_out_of_range", "url")),
        ("good.wav", "100", "2", "", ("channels_mismatch", "channels")),
        ("good.wav", "50", "", "", ("sampling_rate_mismatch", "sampling_rate")),
        ("short.wav", "100", "", "", ("signal_too_short", "url")),
        ("long.wav", "100", "", "", ("signal_too_long", "url")),
        ("../outside.npy", "100", "", "", ("path_escapes_root", "url")),
        ("gone.wav", "100", "", "", ("missing_signal", "url")),
        ("good.wav", "100", "", "no answer", ("missing_answer", "")),
    ]
    lines = ["path,sampling_rate,channels,answer"]
    expected = {}
    for number, (path, rate, channels, answer, outcome) in enumerate(rows, start=2):
        lines.append(f"{path},{rate},{channels},{'' if answer == 'no answer' else 'ok' + str(number)}")
        if outcome:
            expected[number] = outcome
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return expected


def test_bad_signals_are_rejected_with_line_field_and_reason(tmp_path):
    expected = bad_manifest(tmp_path / "export")
    report = convert_into("signals", tmp_path / "export/manifest.csv", tmp_path / "conv", {"val_fraction": 0})
    assert report["issues_by_reason"] == {"missing_signal": 1, "outside_export": 1}
    assert not (tmp_path / "conv/signals/gone.wav").exists()
    out = tmp_path / "valid"
    result = validate(tmp_path / "conv/train.jsonl", out / "clean.jsonl", out / "rejects.jsonl", out / "report.json", {"signals": BOUNDS}).report
    rejects = [r for _, r in read_jsonl(out / "rejects.jsonl")]
    records = {line: r for line, r in read_jsonl(tmp_path / "conv/train.jsonl")}
    found = {}
    for reject in rejects:
        manifest_line = int(records[reject["line"]]["metadata"]["source"].rsplit(":", 1)[1])
        found[manifest_line] = (reject["reason"], reject["field"].rsplit(".", 1)[-1] if "time_series_url" in reject["field"] else "")
        assert json.loads(reject["original"]) == records[reject["line"]]
        assert reject["file"] == str(tmp_path / "conv/train.jsonl")
    assert found == expected
    assert result["records_in"] == 14 and result["records_out"] == 1
    (_, clean), = read_jsonl(out / "clean.jsonl")
    assert clean["metadata"]["source"].endswith("manifest.csv:2")
    assert read_signal(out / clean["messages"][0]["content"][0]["time_series_url"]["url"])[0].shape == (400, 1)


def test_fail_fast_names_the_line_of_a_bad_signal(tmp_path):
    from visionqc.validate import ValidationError

    bad_manifest(tmp_path / "export")
    convert_into("signals", tmp_path / "export/manifest.csv", tmp_path / "conv", {"val_fraction": 0})
    with pytest.raises(ValidationError, match=r"train\.jsonl:2: messages\[0\]\.content\[0\]\.time_series_url\.url: .*broken\.wav.*\[unreadable_signal\]"):
        validate(tmp_path / "conv/train.jsonl", tmp_path / "c", tmp_path / "r", tmp_path / "p", {"signals": BOUNDS, "mode": "fail_fast"})


def test_signal_bounds_must_be_ordered(tmp_path):
    with pytest.raises(ValueError, match=r"validate.signals.seconds must be \[low, high\]"):
        validate(tmp_path / "x.jsonl", tmp_path / "c", tmp_path / "r", tmp_path / "p", {"signals": {"seconds": [5, 1]}})


def ts_record(text="<TS_CONTEXT>\n问", answer="正常", parts=1):
    signal = {"type": "time_series_url", "time_series_url": {"url": "s.wav", "sampling_rate": 100}}
    messages = [{"role": "user", "content": [signal] * parts + [{"type": "text", "text": text}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


@pytest.mark.parametrize(
    ("record", "reason", "field"),
    [
        (ts_record(text="没有占位符"), "placeholder_mismatch", "messages[0].content"),
        (ts_record(parts=2), "placeholder_mismatch", "messages[0].content"),
        (ts_record(answer=None), "missing_answer", "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "time_series_url", "time_series_url": {"url": "s.wav"}}]}]}, "missing_key",
         "messages[0].content[0].time_series_url.sampling_rate"),
        ({"messages": [{"role": "user", "content": [{"type": "time_series_url", "time_series_url": {"url": "", "sampling_rate": 5}}]}]},
         "empty_value", "messages[0].content[0].time_series_url.url"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "missing_key", "messages[0].content[0].text"),
    ],
)
def test_contract_checks_time_series_records(record, reason, field):
    errors, _ = contract.check_record(record)
    assert [(e.reason, e.field) for e in errors] == [(reason, field)]


def test_a_good_time_series_record_and_plain_chat_pass():
    assert contract.check_record(ts_record()) == ([], [])
    assert contract.check_record({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]}) == ([], [])


def test_rebase_moves_signal_urls(tmp_path):
    record = ts_record()
    contract.rebase_media(record, tmp_path / "convert/ds", tmp_path / "validate/ds")
    assert contract.time_series_parts(record)[0][1]["url"] == "../../convert/ds/s.wav"


def test_missing_xtuner_v1_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "xtuner.v1", None)
    with pytest.raises(RuntimeError, match=r"need XTuner V1, but the installed xtuner has no xtuner\.v1.*pip install --no-deps \"xtuner @ git\+https://github\.com/InternLM/xtuner@b934f46"):
        require_xtuner()
