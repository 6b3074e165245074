"""Node.adopt (`mlxmoe up`: another Mac joined, the plan changed around this node): a manifest in which
everything this node loaded is byte for byte the same is served from then on; one that changes any of
its files (trunk, group, overlay, tokenizer) or its experts is refused, naming why, and nothing changes."""

from __future__ import annotations

import copy

import pytest

from mlxmoe.errors import MlxMoeError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from mlxmoe.node.engine import Node
    from mlxmoe.ui.demo import ensure_bundle

    return Node.load(str(ensure_bundle(tmp_path_factory.mktemp("adopt"), 2, quiet=True, equal=True)), 0)


def test_adopt_takes_a_plan_that_keeps_this_nodes_files(node):
    d = node.manifest.to_dict()
    d["created"] = "2026-12-07T00:00:00Z"
    d["files"]["experts-group-01.safetensors"]["sha256"] = "0" * 64  # another node's part changed
    assert node.adopt(d) == node.manifest.hash
    assert node.manifest.created == d["created"]
    assert node.manifest.files["experts-group-01.safetensors"]["sha256"] == "0" * 64


@pytest.mark.parametrize("change,why", [
    (lambda d: d["files"]["trunk.safetensors"].update(sha256="1" * 64), "files of group 0 differ"),
    (lambda d: d["files"]["experts-group-00.safetensors"].update(sha256="1" * 64), "files of group 0 differ"),
    (lambda d: d["files"].pop("tokenizer.json"), "files of group 0 differ"),
    (lambda d: [ids.reverse() for ids in d["grouping"]["layers"].values()], "group 0 holds other experts"),
])
def test_adopt_refuses_a_plan_that_changes_this_nodes_part(node, change, why):
    before = node.manifest.hash
    d = copy.deepcopy(node.manifest.to_dict())
    change(d)
    with pytest.raises(MlxMoeError, match=why):
        node.adopt(d)
    assert node.manifest.hash == before
