"""RunJournal keeps summaries in memory and full records on disk."""

from __future__ import annotations

import json

from cp_deploy.journal import RESULTS_FILE, RunJournal


def _rec(i: int) -> dict:
    return {"path": f"img_{i:03d}.png", "status": "ok", "mask": f"masks/img_{i:03d}.png", "width": 64,
            "instances": [{"box": [1.0, 2.0, 3.0, 4.0], "points": [[1.5, 2.5]] * 8}], "timings_ms": {"encode": 1.0}}


def test_memory_holds_summaries_and_finalize_writes_full_records_sorted(tmp_path):
    journal = RunJournal(tmp_path)
    recs = [_rec(i) for i in (3, 1, 2)]
    journal.append(recs[:2])
    journal.append([recs[2], {**recs[0], "status": "error", "error": "x"}])  # a later record of the same path wins
    assert all(set(r) <= set(RunJournal.SUMMARY_KEYS) for r in journal.records.values())
    assert "instances" not in journal.records["img_001.png"]
    journal.finalize()
    lines = [json.loads(x) for x in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    assert [r["path"] for r in lines] == ["img_001.png", "img_002.png", "img_003.png"]
    assert lines[0] == recs[1] and lines[2]["status"] == "error" and lines[2]["instances"] == recs[0]["instances"]


def test_resume_reads_results_and_journal_back_in_full(tmp_path):
    first = RunJournal(tmp_path)
    first.append([_rec(1), _rec(2)])
    first.finalize()
    second = RunJournal(tmp_path)
    second.load()
    second.append([{**_rec(2), "width": 99}, _rec(3)])
    second.close()  # killed before finalize: results.jsonl and the journal both hold records
    third = RunJournal(tmp_path)
    third.load()
    full = {r["path"]: r for r in third.full_records()}
    assert sorted(full) == ["img_001.png", "img_002.png", "img_003.png"]
    assert full["img_002.png"]["width"] == 99 and full["img_001.png"] == _rec(1)
    del third.records["img_003.png"]  # a record the planner drops is not written
    third.finalize()
    assert [json.loads(x)["path"] for x in (tmp_path / RESULTS_FILE).read_text().splitlines()] == [
        "img_001.png", "img_002.png"]
