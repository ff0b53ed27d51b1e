"""The chaos soak's short mode (``python -m bench.soak --short``) against a real fleet.

About 30 s of mixed traffic from 120 clients while faults are injected every
few seconds (seed 3: a channel server, an admin server and the webapp killed, a
region drained, a gateway restarted); then every connection's stream is checked against the webapp's
database. The soak exits 1 unless nothing was lost, duplicated or reordered;
this test also checks that the run did what it says (faults injected,
connections checked, events of every kind persisted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("picows", reason="the soak's clients need picows (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parents[2]
SOAK_TIMEOUT_S = 240.0
KNOWN_LOSS_CAUSES: tuple[str, ...] = ()  # loss causes tolerated: none


@pytest.mark.timeout(SOAK_TIMEOUT_S + 30)
def test_short_chaos_soak_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    raw = tmp_path / "soak-inputs.pkl"  # on a failure: python -m bench.soak --recheck <this>
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--short", "--seed", "3", "--json", str(out), "--raw", str(raw)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SOAK_TIMEOUT_S,
        check=False,
    )
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    verdict = result["verdict"]
    # No loss is tolerated. (Joins and leaves racing a move of the connection once lost events,
    # docs/soak.md "Findings"; KNOWN_LOSS_CAUSES stays empty now that they resume exactly.)
    known = sum(n for cause, n in verdict["lost_by_cause"].items() if cause in KNOWN_LOSS_CAUSES)
    summary = {k: verdict[k] for k in ("lost", "duplicated", "reordered", "lost_from_history", "unmatched_frames")}
    summary["delivered_to_non_member"] = verdict["delivered_to_non_member"]
    summary["lost"] -= known
    detail = f"inputs kept in {raw}: {summary} {verdict['lost_by_cause']} {json.dumps(verdict['examples'])[:3000]}\n{proc.stdout[-3000:]}"
    assert not any(summary.values()), detail
    assert proc.returncode == (0 if not known else 1), detail
    # the run did what it says: chaos, churn, traffic of every kind, and a real check
    assert len(result["faults_by_kind"]) >= 4, result["faults"]
    assert not result["faults_failed"], result["faults_failed"]
    assert verdict["connections"] > verdict["clients"] == 120  # reconnects made new connections
    # seed 3 deals a drain and a gateway restart (moved connections that must resume exactly) and a webapp kill
    assert result["sessions_by_start"].get("moved", 0) > 0, result["sessions_by_start"]
    assert result["sessions_by_start"].get("client_reconnect", 0) > 0, result["sessions_by_start"]
    assert verdict["pairs_by_reason"]["delivered"] > 1000
    kinds = result["events_by_kind"]
    for kind in ("message", "message/message_changed", "message/message_deleted", "reaction_added"):
        assert kinds.get(kind, 0) > 0, kinds
    assert kinds.get("member_joined_channel", 0) > 0 and kinds.get("member_left_channel", 0) > 0, kinds
    assert result["frames_by_type"].get("user_typing", 0) > 0, result["frames_by_type"]
