"""Proof that `train` resumed a run rather than started it over: equal weights alone cannot tell, since a
tiny run started over from the same seed ends with the same weights."""

from __future__ import annotations

import json
from pathlib import Path


def tag_records(run: Path) -> list[dict]:
    """Mark every record of `run`/metrics.jsonl ("tagged": true) before resuming it: a resume keeps the
    records through its step (tags and all) and writes the later ones afresh; a run started over drops
    them all. Returns the tagged records."""
    path = run / "metrics.jsonl"
    records = [{**json.loads(line), "tagged": True} for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def assert_resumed(run: Path, step: int, tagged: list[dict], log: str) -> list[int]:
    """`run`'s latest `train` restored checkpoint `step` (`log`: what it logged, INFO included) and kept
    the `tagged` records through `step`, each step once; returns the steps of the records after it."""
    restores = [line for line in log.splitlines() if "restoring checkpoint" in line]
    assert f"restoring checkpoint {(run / 'checkpoints').absolute()}/{step}" in log, \
        f"checkpoint {step} was not restored (restores logged: {restores})"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in tagged if r["step"] <= step]
    assert kept and records[:len(kept)] == kept, "the records through the restored step, as they were"
    later = records[len(kept):]
    assert later and not any(r.get("tagged") for r in later), "written by the resumed run"
    assert all(r["step"] > step for r in later), [r["step"] for r in later]
    return [r["step"] for r in later]
