"""bench/summarize.py reads bench/_util.report's runs and leaves other records in the same folder alone."""
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import summarize  # noqa: E402


def test_recorded_results_make_a_table_and_own_records_are_left_out(tmp_path):
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "results")
    (tmp_path / "results" / "own-record.json").write_text(json.dumps({"environment": {}, "rows": {"kept": {}}}))
    runs = summarize.load(str(tmp_path / "results"))
    assert runs and all(isinstance(run["rows"], list) for run in runs)
    assert "own-record.json" not in {run["file"] for run in runs}
    text = summarize.table(runs)
    assert "| fused_linear |" in text and "| merge |" in text
