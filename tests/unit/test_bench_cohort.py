"""scripts/bench_cohort.py on a tiny cohort: serial and two shards, the JSON records the issue asks for, and that
every mode wrote the serial label maps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tools import load_script

bench = load_script("bench_cohort")


@pytest.mark.slow
def test_serial_and_shards_records(untrained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--cases", "3", "--size", "32", "--modes", "serial,shards", "--model", str(untrained_run),
                       "--work", str(tmp_path / "w"), "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["mode"] for r in records] == ["serial", "shards"]
    for record in records:
        assert record["cases"] == 3 and record["seconds"] > 0 and record["peak_rss_gb_per_worker"] > 0.05
        assert record["cases_per_minute"] == pytest.approx(3 / record["seconds"] * 60, rel=0.05)
        assert record["same_as_serial"] is True
        assert set(record["stage_seconds_per_case"]) == {"read", "preprocess", "infer", "write"}
    assert records[1]["workers"] == 2 and records[1]["worker_processes"] == 2


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--modes", "serial,cluster", "--work", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tmp_path), "--work", str(tmp_path)])
