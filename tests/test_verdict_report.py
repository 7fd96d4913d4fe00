"""The verdict report: a static page and a CSV of a mission's verdicts, read in headless Chromium as a person would."""

from __future__ import annotations

import csv
import json

import pytest

from visionqc.verdict_report import run_verdict_report

from conftest import make_image

# (group folder, label, verdict, photos, unreadable photo numbers)
GROUPS = [("G1", "pass", "通过", 2, ()), ("G2", "fail", "通过", 1, ()), ("G3", "fail", "不通过", 3, ()),
          ("T-1", None, "不通过", 2, (2,)), ("T-2", None, "通过", 1, ())]


@pytest.fixture
def mission(tmp_path) -> dict:
    """A mission's photos, Stage-A summaries and Stage-B verdicts, as those stages write them."""
    root = tmp_path / "photos"
    summaries, verdicts = [], []
    for group_id, label, verdict, count, unreadable in GROUPS:
        folder = {"pass": "审核通过/", "fail": "审核不通过/", None: ""}[label] + group_id
        images = [f"任务/{folder}/{n}.jpg" for n in range(1, count + 1)]
        for n, path in enumerate(images, start=1):
            make_image(root / path, size=(640, 480), color=(40 * n, 120, 200))
        lost = {f"image_{n}": f"{n}.jpg does not decode: truncated" for n in unreadable}
        summaries.append({"group_id": group_id, "mission": "任务", "label": label, "images": images,
                          "per_image": {f"image_{n}": "" if n in unreadable else f'{{"统计":[{{"类别":"BBU","数量":{n}}}]}}'
                                        for n in range(1, count + 1)}, "unreadable": lost})
        key = f"{group_id}::{label}" if label else group_id
        verdicts.append({"ticket_key": key, "verdict": verdict, "reason": f"理由<{group_id}>",
                         "judged_by": "policy" if unreadable else "model"})
    for name, rows in (("a.jsonl", summaries), ("b.jsonl", verdicts)):
        (tmp_path / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")
    out = tmp_path / "report"
    result = run_verdict_report(tmp_path / "a.jsonl", tmp_path / "b.jsonl", root, mission="任务", page_out=out / "任务.html",
                                table_out=out / "任务.csv", thumbnails_out=out / "任务.thumbs")
    return {"out": out, "result": result}


def test_the_table_puts_failed_groups_first_and_marks_disagreements(mission):
    out = mission["out"]
    raw = (out / "任务.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # spreadsheet programs read the Chinese text
    rows = list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))
    assert [row["ticket_key"] for row in rows] == ["G3::fail", "T-1", "G1::pass", "G2::fail", "T-2"]
    assert [row["agrees"] for row in rows] == ["yes", "", "yes", "no", ""]
    assert rows[1]["unreadable"] == "1" and "image_2: 2.jpg does not decode" in rows[1]["summaries"]
    assert rows[0]["photos"].split(";") == [f"任务/审核不通过/G3/{n}.jpg" for n in (1, 2, 3)]
    assert mission["result"].report == {"groups": 5, "fail": 2, "pass": 3, "unreadable": 1, "scored": 3, "agree": 2}
    thumbnails = sorted((out / "任务.thumbs").iterdir())
    assert len(thumbnails) == 9 - 1  # every readable photo
    from PIL import Image

    with Image.open(thumbnails[0]) as thumbnail:
        assert max(thumbnail.size) == 192
    assert "理由&lt;G3&gt;" in (out / "任务.html").read_text("utf-8")  # text is escaped, never markup


@pytest.mark.slow
def test_the_page_opens_from_the_file_lists_every_group_and_filters_failed(mission):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from test_mlflow_ui import CHROMEDRIVER, CHROMIUM, FLAGS

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((mission["out"] / "任务.html").as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert [row.get_attribute("data-ticket") for row in rows] == ["G3::fail", "T-1", "G1::pass", "G2::fail", "T-2"]
        first = rows[0].find_element(By.TAG_NAME, "img")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", first) == 192
        assert "unreadable" in rows[1].text and "✗ disagrees" in rows[3].text and "new" in rows[4].text
        assert "2 不通过" in driver.find_element(By.CLASS_NAME, "counts").text
        driver.find_element(By.ID, "only-fail").click()
        shown = [row.get_attribute("data-ticket") for row in rows if row.is_displayed()]
        assert shown == ["G3::fail", "T-1"]
    finally:
        driver.quit()
