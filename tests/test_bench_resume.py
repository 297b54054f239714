"""No lost work: Ctrl-C on a running ``dmr bench`` keeps the finished rows, ``--resume`` finishes the
run without recomputing them, and the result is complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamic_moe_router.cli import EXIT_INTERRUPTED, main

ROOT = Path(__file__).resolve().parents[1]
TINY_SWEEP = [
    "--models", str(ROOT / "models" / "ref-olmoe"), "--families", "top_p",
    "--ppl-tokens", "256", "--blimp-limit", "1", "--lambada-limit", "2", "--calibration-tokens", "512",
]  # fmt: skip


def _rows(partial: Path) -> list[dict]:  # type: ignore[type-arg]
    try:
        state = json.loads(partial.read_text())
    except (OSError, ValueError):  # not written yet
        return []
    return next(iter(state["results"].values()), {}).get("rows", [])


@pytest.mark.slow
def test_sigint_keeps_rows_and_resume_completes_without_recomputing(tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    out = tmp_path / "bench"
    partial = out / "quality_flops.partial.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = ["bench", *TINY_SWEEP, "--out-dir", str(out), "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamic_moe_router.cli", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(_rows(partial)) < 2:  # native and a first top-p point are finished, three to go
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the bench wrote no partial rows"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and stdout == ""
    (line,) = stderr.strip().splitlines()  # one line, saying where the partial results are
    assert str(partial) in line and "--resume" in line
    assert not (out / "quality_flops.json").exists()
    kept = _rows(partial)
    assert len(kept) >= 2

    # other settings: the partial results are not mixed with a different run
    assert main(["bench", *TINY_SWEEP[:-1], "1024", "--out-dir", str(out), "--resume", "--json"]) == 2
    assert "other settings" in capsys.readouterr().err

    import dynamic_moe_router.sweeps.quality as quality

    evaluated = []
    real = quality.evaluate

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        evaluated.append(kwargs.get("policy"))
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "evaluate", counting)
    assert main(["bench", *TINY_SWEEP, "--out-dir", str(out), "--resume", "--json"]) == 0
    capsys.readouterr()
    result = json.loads((out / "quality_flops.json").read_text())
    (model,) = result["models"]
    rows = model["rows"]
    assert rows[: len(kept)] == kept  # the finished rows, wall times included, as they were
    assert len(evaluated) == len(rows) - len(kept)  # only the missing points were evaluated
    assert [r["family"] for r in rows] == ["native"] + ["top_p"] * 4  # each point once, in order
    assert model["model"] == "models/ref-olmoe" and model["data"]["blimp"]["file"].endswith("blimp.jsonl.xz")
    assert not partial.exists() and (out / "pareto.png").stat().st_size > 1000
