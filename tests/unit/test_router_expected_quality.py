"""The router's /status shows each peer's expected quality: its layout node's
held-out measurement from the manifest's calibration (`calibrate --budgets`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fakes import FakeEngine, FakeFrontend, LocalCluster
from mlxmoe.cluster.router.core import expected_quality

pytestmark = pytest.mark.timeout(60)


def held(ppl, worst, agree):
    return {"mean": {"kl": 0.1, "agreement": agree, "ppl_ratio": ppl},
            "worst": {"kl": 0.2, "agreement": agree - 0.1, "ppl_ratio": worst}, "domains": {}, "passages": 8}


LAYOUT = {"layout": {"budgets": ["1x", "1.5x", "3x"],
                     "nodes": [{"budget": "1x", "held_out": held(1.3, 1.45, 0.7)},
                               {"budget": "1.5x", "held_out": held(1.04, 1.09, 0.93)},
                               {"budget": "3x", "held_out": None}]}}


def test_expected_quality_from_a_layouts_calibration():
    m = SimpleNamespace(calibration=LAYOUT)
    assert expected_quality(m, [1]) == {"ppl_ratio": 1.04, "worst_ppl_ratio": 1.09, "agreement": 0.93}
    assert expected_quality(m, [0, 1]) == {"ppl_ratio": 1.3, "worst_ppl_ratio": 1.45, "agreement": 0.7}  # the worst
    assert expected_quality(m, [2]) is None and expected_quality(m, [1, 2]) is None  # not measured
    assert expected_quality(m, [3]) is None and expected_quality(m, []) is None and expected_quality(m, None) is None
    for cal in (None, {}, {"layout": {}}, {"layout": {"nodes": ["odd"]}}, {"layout": {"nodes": [{"held_out": {}}]}},
                {"layout": {"nodes": [{"held_out": {"mean": {}, "worst": {}}}]}}):
        assert expected_quality(SimpleNamespace(calibration=cal), [0]) is None
    assert expected_quality(SimpleNamespace(n_groups=3), [0]) is None  # FakeFrontend's manifest: no calibration
    assert expected_quality(None, [0]) is None  # no front end yet


def test_status_shows_expected_quality_per_peer():
    front = FakeFrontend()
    front.manifest.calibration = LAYOUT
    with LocalCluster([FakeEngine(group=g) for g in range(3)], frontend=front) as c:
        peers = {p["groups"][0]: p for p in c.router.status()["peers"]}
    assert peers[0]["expected_quality"] == {"ppl_ratio": 1.3, "worst_ppl_ratio": 1.45, "agreement": 0.7}
    assert peers[1]["expected_quality"]["worst_ppl_ratio"] == 1.09
    assert "expected_quality" not in peers[2]


def test_status_without_a_layout_has_no_expected_quality():
    with LocalCluster([FakeEngine(group=0)]) as c:
        assert all("expected_quality" not in p for p in c.router.status()["peers"])
