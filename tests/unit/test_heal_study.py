"""tools/heal_study.py's --grouping: a grouping JSON or a bundle (its manifest's
grouping), the same layout either way."""

import importlib.util
import json
from pathlib import Path

from mlxmoe.bundle.manifest import Manifest
from mlxmoe.bundle.split import split

TOOL = Path(__file__).resolve().parents[2] / "tools" / "heal_study.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("heal_study", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grouping_from_bundle_or_json(ckpt, tmp_path):
    hs = load_tool()
    split(str(ckpt("qwen3_moe")), tmp_path / "b", 2, bits=None, trunk_bits=None)
    from_bundle = hs.grouping_of(str(tmp_path / "b"))
    assert from_bundle == Manifest.load(tmp_path / "b").grouping
    (tmp_path / "g.json").write_text(json.dumps(from_bundle))
    assert hs.grouping_of(str(tmp_path / "g.json")) == from_bundle
