"""The built-in default (README command one) meets its bar: the end-to-end proof that masks, EOS, saving, merging
and the inference prompt agree. Runs the same script a newcomer runs, in a temporary work dir."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import IN_WORKER, ROOT, run

from finetune.demo import EOS_BAR, EXACT_MATCH_BAR


@pytest.mark.slow
@pytest.mark.longest
def test_demo_learns_the_task_and_stops_at_eos(tmp_path):
    # alone, it uses every core as a user's run would; beside other test workers, one thread (see conftest)
    threads = os.environ["OMP_NUM_THREADS"] if IN_WORKER else str(os.cpu_count())
    result = run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--work_dir", str(tmp_path / "demo")],
                 cwd=str(tmp_path), OMP_NUM_THREADS=threads)
    print(result.stdout[-2000:])
    outcome = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert outcome["n"] == 200
    assert outcome["exact_match"] >= EXACT_MATCH_BAR, outcome
    assert outcome["stopped_at_eos"] >= EOS_BAR, outcome
    assert result.returncode == 0, result.output[-3000:]
    assert "held-out exact match" in result.stdout
    assert (tmp_path / "demo" / "merged" / "config.json").exists()
