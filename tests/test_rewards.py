"""The GRPO rewards on good, bad and borderline completions, and their ms-swift ORM registration."""

import json

import pytest

from visionqc import rewards

TRUTH = json.dumps({"统计": [{"类别": "BBU", "数量": 2}, {"类别": "标签", "数量": 1}]}, ensure_ascii=False)


def summary(**counts) -> str:
    return json.dumps({"统计": [{"类别": k, "数量": v} for k, v in counts.items()]}, ensure_ascii=False)


@pytest.mark.parametrize("completion, expected", [
    (TRUTH, 1.0),
    ("无关图片", 1.0),
    ("  " + TRUTH + "\n", 1.0),  # surrounding whitespace is not a second line
    ('{"统计": 3}', 1.0),  # valid JSON object: the shape is summary_parse's to judge
    (TRUTH + "\n" + TRUTH, 0.0),  # two lines
    ("[1, 2]", 0.0),  # JSON, not an object
    ("BBU×2，标签×1", 0.0),  # the legacy form
    ('{"统计": [', 0.0),  # cut off
    ("", 0.0),
    ("无关图片。", 0.0),  # near the literal is not the literal
])
def test_summary_format(completion, expected):
    assert rewards.summary_format(completion) == expected


@pytest.mark.parametrize("completion, expected", [
    (TRUTH, 1.0),
    ("无关图片", 1.0),
    (summary(), 1.0),  # an empty 统计 list is a valid shape
    ('{"统计": 3}', 0.0),
    ('{"统计": [{"类别": "BBU"}]}', 0.0),  # no 数量
    ('{"统计": [{"类别": "BBU", "数量": -1}]}', 0.0),
    ('{"统计": [{"类别": "BBU", "数量": 1.5}]}', 0.0),
    ('{"统计": [{"类别": "BBU", "数量": 1}, {"类别": "BBU", "数量": 2}]}', 0.0),  # a category twice
    ('{"统计": [{"类别": "", "数量": 1}]}', 0.0),
])
def test_summary_parse(completion, expected):
    assert rewards.summary_parse(completion) == expected


@pytest.mark.parametrize("completion, categories, counts, f1", [
    (TRUTH, 1.0, 1.0, 1.0),
    (summary(BBU=2), 0.5, 0.5, 2 * 2 / (2 + 3)),  # one category missing
    (summary(BBU=1, 标签=1), 1.0, 0.5, 2 * 2 / (2 + 3)),  # right categories, one count off by one
    (summary(BBU=2, 标签=1, 线缆=4), 2 / 3, 2 / 3, 2 * 3 / (7 + 3)),  # an extra category
    (summary(BBU=2, 标签=1, 线缆=0), 2 / 3, 1.0, 1.0),  # an extra category counted 0: the counts agree, the names don't
    (summary(线缆=3), 0.0, 0.0, 0.0),
    ("无关图片", 0.0, 0.0, 0.0),  # nothing predicted where there are objects
    ("not json", 0.0, 0.0, 0.0),
])
def test_summary_content_rewards(completion, categories, counts, f1):
    assert rewards.summary_categories(completion, TRUTH) == pytest.approx(categories)
    assert rewards.summary_counts(completion, TRUTH) == pytest.approx(counts)
    assert rewards.summary_content_f1(completion, TRUTH) == pytest.approx(f1)


@pytest.mark.parametrize("completion, total, content", [
    (TRUTH, 1.0, 1.0),
    (summary(标签=1, BBU=2), 1.0, 1.0),  # the order of the entries does not matter
    (summary(BBU=3), 1.0, 0.0),  # the right total, the wrong content
    (summary(BBU=2), 2 / 3, 0.0),
    (summary(BBU=2, 标签=1, 线缆=3), 0.5, 0.0),  # 3 of 6
    ("无关图片", 0.0, 0.0),
    ("not json", 0.0, 0.0),
])
def test_summary_total_and_exact_content(completion, total, content):
    assert rewards.summary_objects_total(completion, TRUTH) == pytest.approx(total)
    assert rewards.summary_content(completion, TRUTH) == content


def test_summary_header_and_dataset_compare_the_fields_beside_the_counts():
    tagged = json.dumps({"数据集": "BBU", "统计": json.loads(TRUTH)["统计"]}, ensure_ascii=False)
    other_site = json.dumps({"数据集": "RRU", "统计": []}, ensure_ascii=False)
    reordered = json.dumps({"统计": [], "数据集": "BBU"}, ensure_ascii=False)
    assert rewards.summary_header(tagged, tagged) == rewards.summary_header(other_site, tagged) == 1.0  # same keys, same order
    assert rewards.summary_header(reordered, tagged) == 0.5
    assert rewards.summary_header(TRUTH, tagged) == 0.5  # 1 of 2 keys
    assert rewards.summary_header("无关图片", "无关图片") == 1.0 and rewards.summary_header(TRUTH, "无关图片") == 0.0
    assert rewards.summary_dataset(tagged, tagged) == rewards.summary_dataset(reordered, tagged) == 1.0
    assert rewards.summary_dataset(other_site, tagged) == 0.0
    assert rewards.summary_dataset(TRUTH, tagged) == 0.0  # the tag left out
    assert rewards.summary_dataset(TRUTH, TRUTH) == rewards.summary_dataset("无关图片", TRUTH) == 1.0  # nothing beside the counts
    for reward in (rewards.summary_header, rewards.summary_dataset):
        assert reward("not json", tagged) == reward(tagged, "not json") == 0.0


def test_an_irrelevant_image_is_matched_only_by_an_empty_answer():
    for reward in (rewards.summary_categories, rewards.summary_counts, rewards.summary_content_f1, rewards.summary_objects_total,
                   rewards.summary_content):
        assert reward("无关图片", "无关图片") == 1.0
        assert reward(summary(), "无关图片") == 1.0  # no categories either way
        assert reward(summary(BBU=1), "无关图片") == 0.0


def test_content_f1_weighs_by_count():
    """Every object weighs the same: one missed object costs the same in any category, and less in a bigger scene."""
    many = summary(BBU=1, 线缆=10)
    assert rewards.summary_content_f1(summary(BBU=1, 线缆=9), many) == rewards.summary_content_f1(summary(线缆=10), many)
    few = summary(BBU=1, 线缆=1)
    assert rewards.summary_content_f1(summary(BBU=1, 线缆=9), many) > rewards.summary_content_f1(summary(BBU=1), few)
    # while summary_counts scores categories, not objects: one wrong count is half of two categories either way
    assert rewards.summary_counts(summary(BBU=1, 线缆=9), many) == rewards.summary_counts(summary(BBU=1), few) == 0.5


PASS = "通过\n理由: 每台BBU都有标签"
FAIL = "不通过\n理由: 图片_2缺少标签"


@pytest.mark.parametrize("completion, fmt, label_vs_pass", [
    (PASS, 1.0, 1.0),
    (FAIL, 1.0, 0.0),
    ("通过\n理由：全角冒号也可以", 1.0, 1.0),
    ("  通过\n理由: 前后空白  \n", 1.0, 1.0),
    ("通过", 0.0, 0.0),  # no reason line
    ("通过\n理由:", 0.0, 0.0),  # an empty reason
    ("通过\n原因: 每台BBU都有标签", 0.0, 0.0),
    ("通过\n理由: 有标签\n另外一行", 0.0, 0.0),  # three lines
    ("通过了\n理由: 有标签", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_verdict_rewards(completion, fmt, label_vs_pass):
    assert rewards.verdict_format(completion) == fmt
    assert rewards.verdict_label(completion, PASS) == label_vs_pass
    assert rewards.verdict_label(completion, FAIL) == (fmt if not label_vs_pass else 0.0)


def test_a_reward_skips_prompts_of_the_other_task():
    scored = rewards.score_batch("verdict_label", [PASS, TRUTH], ["verdict", "summary"], [PASS, TRUTH])
    assert scored == [1.0, None]
    assert rewards.score_batch("summary_parse", [PASS, TRUTH], ["verdict", "summary"], [PASS, TRUTH]) == [None, 1.0]


def test_every_reward_registers_as_an_ms_swift_orm():
    from swift.rewards import ORM, orms

    names = rewards.register()
    assert set(names) == set(rewards.REWARDS) and len(names) == 11
    reward = orms["summary_counts"]()
    assert isinstance(reward, ORM) and type(reward).__name__ == "summary_counts"
    assert reward([summary(BBU=1, 标签=1), PASS], task=["summary", "verdict"], solution=[TRUTH, PASS]) == [0.5, None]
    with pytest.raises(ValueError, match="need `task` and `solution`"):
        reward([TRUTH])
