"""mlxmoe/modes.py: the router modes, the node routing modes, and the mapping."""

from mlxmoe.modes import DEFAULT_MODE, ROUTER_MODES, ROUTING_MODES, node_routing


def test_router_mode_to_node_routing():
    assert DEFAULT_MODE in ROUTER_MODES
    assert node_routing("onehop", None, 0) == "onehop" and node_routing("split", 1, 0) == "split"
    assert node_routing("soft", 1, 0) == "group" and node_routing("hard", 1, 0) == "group"
    assert node_routing("soft", 0, 0) == "local" and node_routing("soft", None, 0) == "local"
    assert {node_routing(m, None, 0) for m in ROUTER_MODES} <= set(ROUTING_MODES)
