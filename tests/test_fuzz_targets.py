"""The fuzz targets in CI: every saved input still gets a clean answer, and a short seeded run of
libFuzzer on each target finds nothing new.

``make fuzz`` runs the same targets for over a million inputs (tests/fuzz/run.py); here the corpus
(tests/fuzz/corpus) and every input that ever found a bug (tests/fuzz/crashes) are replayed, so a
fixed bug stays fixed, and a slice of a few thousand inputs per target runs under the same
per-input timeout and RSS limit as the long run.
"""

from __future__ import annotations

import traceback

import pytest
from fuzz import run
from fuzz.targets import TARGETS

SLICE_RUNS = 1500
"""Inputs per target in the CI slice: a few seconds each, deterministic for a given seed."""


def saved_inputs(target: str) -> list:
    found = []
    for directory in (run.CORPUS / target, run.CRASHES / target):
        if directory.is_dir():
            found.extend(sorted(directory.iterdir()))
    return found


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_saved_input_is_answered_without_a_crash(target):
    inputs = saved_inputs(target)
    assert inputs, f"tests/fuzz/corpus/{target} is empty: run tests/fuzz/make_corpus.py"
    failures = []
    for path in inputs:
        try:
            TARGETS[target].run(path.read_bytes())
        except Exception:
            failures.append(f"{path.relative_to(run.HERE)}:\n{traceback.format_exc(limit=-4)}")
    assert not failures, "\n".join(failures)


def test_a_short_seeded_fuzz_run_of_every_target_finds_nothing():
    results = run.fuzz_all(list(TARGETS), runs=SLICE_RUNS, seed=1, jobs=2, save_crashes=False)
    for result in results:
        assert result.exit_code == 0 and not result.findings, (
            f"{result.target}: {result.findings}\n{result.log[-4000:]}"
        )
        assert result.runs == SLICE_RUNS, f"{result.target} ran {result.runs} inputs"
    assert max(r.peak_rss_mb for r in results) < run.RSS_LIMIT_MB
