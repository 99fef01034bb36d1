"""The topologies and the ARI app's plan for each (no Asterisk)."""

from __future__ import annotations

import pytest

from harness.ari import MediaPlan
from harness.topology import DIAL, SOFTMIX_INTERVAL_MS, TOPOLOGIES, Creation, topology


def test_every_topology_has_a_plan_and_says_what_it_needs() -> None:
    assert list(TOPOLOGIES) == [
        "dial",
        "dial-in",
        "ari",
        "ari-in",
        "ari-softmix",
        "ari-third-party",
    ]
    assert not DIAL.needs_ari and not DIAL.mixes and DIAL.mixing_interval_ms == 0
    assert TOPOLOGIES["dial-in"].needs_ari, "the UserEvent with the connection id comes by ARI"
    for name in ("ari", "ari-in", "ari-softmix", "ari-third-party"):
        assert TOPOLOGIES[name].creation is Creation.ARI
    assert TOPOLOGIES["ari"].plan() == MediaPlan()
    assert TOPOLOGIES["ari-in"].plan() == MediaPlan(connection_type="server")
    assert TOPOLOGIES["ari-softmix"].plan() == MediaPlan(bridge_type="mixing,video_sfu")
    assert TOPOLOGIES["ari-third-party"].plan() == MediaPlan(third_party=True)
    assert TOPOLOGIES["ari-softmix"].mixing_interval_ms == SOFTMIX_INTERVAL_MS
    assert TOPOLOGIES["ari-third-party"].max_lag_ms == 4 * SOFTMIX_INTERVAL_MS
    assert DIAL.max_lag_ms == 0


def test_an_unknown_topology_names_the_known_ones() -> None:
    assert topology("ari-in") is TOPOLOGIES["ari-in"]
    with pytest.raises(ValueError, match="dial-in"):
        topology("ari-out")
