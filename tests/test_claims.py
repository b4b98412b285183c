"""scripts/reproduce_claims.py --quick: the whole claims pipeline end to end on tiny sizes (a smoke test: the
direction of each claim is what the full mode measures, so it is not asserted here)."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO, launched, subprocess_env

CLAIMS = ["001 p=0.75 after search R@1 I→T", "001 p=0.75 after search R@1 T→I",
          "001 p=0.75 after fine-tune R@1 I→T", "001 p=0.75 after fine-tune R@1 T→I",
          "004 ProtoRKD linear probe acc1", "CLIP-KD zero-shot acc1", "002 student top-20 vs teacher top-1"]
NUMBER = r"[01]\.\d{4} ± \d\.\d{4}"


def test_quick_claims_table(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce_claims.py"), "--out", str(tmp_path), "--quick"]
    # launched: a timeout also ends the harness's own trainer subprocesses
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with launched(cmd, cwd=REPO, env=subprocess_env(), **pipes) as proc:
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("claim "))
    assert "quick: 1 seed" in lines[header - 1]
    rows = lines[header + 1:]
    for claim, row in zip(CLAIMS, rows):
        assert row.startswith(claim), row
        fields = [f.strip() for f in row.split("|")]
        assert len(fields) == 5, row
        assert re.fullmatch(rf"\S.* {NUMBER}", fields[1]) and re.fullmatch(rf"\S.* {NUMBER}", fields[2]), row
        assert fields[3] == "1/1" and fields[4] in ("yes", "no"), row
    lowrank = rows[len(CLAIMS)]
    assert lowrank.startswith("003 zero-shot acc1 by low-rank image layers")
    # the teacher (0 layers factorised) then one entry per image block of the 2-block model
    assert re.search(r"\| 0: [01]\.\d{4}, 1: [01]\.\d{4}, 2: [01]\.\d{4} \| monotone falling: (yes|no)$", lowrank)
