#!/usr/bin/env python3
"""`make fuzz`: every target under libFuzzer (atheris), each in its own process with its share of
the runs, a per-input timeout and an RSS limit; the last line sums it up as ``key=value`` pairs.

    .venv/bin/python tests/fuzz/run.py                     # the full run (make fuzz)
    .venv/bin/python tests/fuzz/run.py --scale 0.1 codec   # a tenth of it, one target
    FUZZ_TARGET=codec .venv/bin/python tests/fuzz/run.py -runs=1000 SCRATCH tests/fuzz/corpus/codec

Each process starts from the committed corpus and the saved crash inputs (read-only; what it
learns goes to a scratch directory). An input that crashes, hangs or exhausts memory is copied
to tests/fuzz/crashes/<target>/, which pytest replays, so it stays a regression test once the
bug is fixed; ``--merge`` adds the inputs that reached new code to the committed corpus.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
TIMEOUT_S = 10  # per input: longer is a hang
RSS_LIMIT_MB = 1024
# libFuzzer's artifact prefixes: what each kind of finding is called in the summary.
_FINDINGS = {"crash": "crashes", "timeout": "hangs", "oom": "ooms", "leak": "crashes"}
# The code whose coverage guides the search; the harness itself is left out.
_INSTRUMENTED = ["broker", "enrollment", "tpm2_pytss"]


@dataclass
class Result:
    target: str
    runs: int = 0
    seconds: float = 0.0
    peak_rss_mb: int = 0
    findings: dict[str, list[Path]] = field(default_factory=dict)
    exit_code: int = 0
    log: str = ""

    def count(self, kind: str) -> int:
        return len(self.findings.get(kind, []))


def worker(name: str, libfuzzer_args: list[str]) -> None:
    """Runs in the child: instrument the code under test, then hand the target to libFuzzer.

    The target is named in the environment (FUZZ_TARGET), not the arguments, because libFuzzer
    runs argv again for -merge and would take an extra argument for a corpus directory."""
    import atheris

    sys.path.insert(0, str(HERE.parent))
    with atheris.instrument_imports(include=_INSTRUMENTED):
        from fuzz.targets import TARGETS

        TARGETS[name].run(b"")  # imports done lazily by the target, instrumented too
    atheris.Setup([sys.argv[0], *libfuzzer_args], TARGETS[name].run)
    atheris.Fuzz()


def fuzz(
    name: str, runs: int, *, seed: int, scratch: Path, save_crashes: bool, merge: bool
) -> Result:
    """One target in a child process; its findings, runs and peak RSS from libFuzzer's report."""
    sys.path.insert(0, str(HERE.parent))
    from fuzz.targets import TARGETS

    target = TARGETS[name]
    work = scratch / name
    artifacts = scratch / f"{name}-artifacts"
    work.mkdir(parents=True)
    artifacts.mkdir()
    dirs = [str(work)] + [str(d / name) for d in (CORPUS, CRASHES) if (d / name).is_dir()]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"-runs={runs}",
        f"-seed={seed}",
        f"-max_len={target.max_len}",
        f"-timeout={TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        *dirs,
    ]
    started = time.monotonic()
    # libFuzzer's -merge runs this file again through the shell: with the venv's python3.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "FUZZ_TARGET": name, "PATH": path}
    child = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    result = Result(name, seconds=time.monotonic() - started, exit_code=child.returncode)
    result.log = child.stderr + child.stdout
    if done := re.search(r"stat::number_of_executed_units:\s*(\d+)", result.log):
        result.runs = int(done.group(1))
    result.peak_rss_mb = max((int(m) for m in re.findall(r"rss: (\d+)Mb", result.log)), default=0)
    if peak := re.search(r"stat::peak_rss_mb:\s*(\d+)", result.log):
        result.peak_rss_mb = max(result.peak_rss_mb, int(peak.group(1)))
    for artifact in sorted(artifacts.iterdir()):
        kind = _FINDINGS.get(artifact.name.split("-", 1)[0])
        if kind is None:
            continue
        kept = artifact
        if save_crashes:
            (CRASHES / name).mkdir(parents=True, exist_ok=True)
            kept = CRASHES / name / artifact.name
            shutil.copyfile(artifact, kept)
        result.findings.setdefault(kind, []).append(kept)
    if merge and not result.findings:
        subprocess.run(
            [*command[:2], "-merge=1", f"-max_len={target.max_len}", str(CORPUS / name), str(work)],
            capture_output=True,
            check=True,
            env=env,
        )
    return result


def fuzz_all(
    names: list[str],
    *,
    scale: float = 1.0,
    runs: int | None = None,
    seed: int = 1,
    jobs: int = 2,
    save_crashes: bool = True,
    merge: bool = False,
) -> list[Result]:
    """Each target for ``scale`` times its share of the runs (or for ``runs``), ``jobs``
    processes at a time."""
    sys.path.insert(0, str(HERE.parent))
    from fuzz.targets import TARGETS

    with (
        tempfile.TemporaryDirectory(prefix="fleetgate-fuzz-") as scratch,
        ThreadPoolExecutor(max_workers=jobs) as pool,
    ):
        futures = [
            pool.submit(
                fuzz,
                name,
                runs or max(1, round(TARGETS[name].runs * scale)),
                seed=seed,
                scratch=Path(scratch),
                save_crashes=save_crashes,
                merge=merge,
            )
            for name in names
        ]
        return [future.result() for future in futures]


def summary(results: list[Result], seconds: float) -> str:
    totals = {kind: sum(r.count(kind) for r in results) for kind in ("crashes", "hangs", "ooms")}
    failed = sum(1 for r in results if r.exit_code and not any(r.findings.values()))
    pairs = {
        "fuzz_inputs": sum(r.runs for r in results),
        **totals,
        "errors": failed,
        "max_rss_mb": max((r.peak_rss_mb for r in results), default=0),
        "targets": len(results),
        "seconds": round(seconds),
    }
    return " ".join(f"{key}={value}" for key, value in pairs.items())


def main() -> int:
    if target := os.environ.get("FUZZ_TARGET"):
        worker(target, sys.argv[1:])
        return 0
    sys.path.insert(0, str(HERE.parent))
    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every target's runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="targets fuzzed at once")
    parser.add_argument("--merge", action="store_true", help="grow the committed corpus")
    options = parser.parse_args()
    unknown = set(options.targets) - set(TARGETS)
    if unknown:
        parser.error(f"no such target: {', '.join(sorted(unknown))}")
    started = time.monotonic()
    results = fuzz_all(
        options.targets or list(TARGETS),
        scale=options.scale,
        seed=options.seed,
        jobs=options.jobs,
        merge=options.merge,
    )
    for r in results:
        found = ", ".join(f"{k}: {', '.join(map(str, v))}" for k, v in r.findings.items())
        print(
            f"{r.target}: {r.runs} inputs in {r.seconds:.0f} s, peak RSS {r.peak_rss_mb} MB"
            + (f"; {found}" if found else "")
        )
        if r.exit_code and not found:
            print(f"{r.target}: libFuzzer exited {r.exit_code} without a finding:\n{r.log[-3000:]}")
        elif found:
            print(r.log[-6000:])
    line = summary(results, time.monotonic() - started)
    print(line)
    return 0 if " crashes=0 hangs=0 ooms=0 errors=0 " in f" {line} " else 1


if __name__ == "__main__":
    sys.exit(main())
