"""The live quality meter (model/meter.py): what a node measures equals the full
model masked the same way, 1.0 with every expert eligible, in [0, 1], reset by
each read, and it never changes what the model computes."""

import mlx.core as mx
import numpy as np
import pytest

from mlxmoe.bundle.split import split
from mlxmoe.model import meter
from mlxmoe.model.load import load_bundle


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("meter") / "b"
    split(str(ckpt("qwen3_moe")), d, 2, bits=None, trunk_bits=None)
    return d


IDS = [3, 17, 5, 42, 8, 11, 29, 2]


def test_quality_meter_add_by_hand():
    q = meter.QualityMeter(2, "softmax")
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    q.add(logits[None], mx.array([False, True, True, True]))  # top-2 of all: 0.8; of the eligible: 0.45
    q.add(logits[None], None)
    assert q.per_token().tolist() == pytest.approx([(0.45 / 0.8 + 1.0) / 2], abs=1e-5)
    assert q.mean() == pytest.approx((0.45 / 0.8 + 1.0) / 2, abs=1e-5)


def test_node_meter_equals_masked_full_model(bundle):
    node, full = load_bundle(bundle, 1), load_bundle(bundle)
    m = node.manifest
    full.set_eligible({l: m.eligible(1, l) for l in m.moe_layers})
    values = []
    for loaded in (node, full):
        q = meter.start(loaded)
        before = np.array(loaded.model(mx.array([IDS])))
        values.append(np.array(q.per_token()))
        assert meter.read(loaded) == pytest.approx(float(values[-1].mean()), abs=1e-6)
        assert meter.read(loaded) is None  # reset by the read
        meter.stop(loaded)
        np.testing.assert_array_equal(before, np.array(loaded.model(mx.array([IDS]))))  # outputs untouched
    np.testing.assert_allclose(values[0], values[1], atol=1e-5)
    assert ((values[0] > 0) & (values[0] <= 1 + 1e-6)).all() and values[0].min() < 1


def test_every_expert_eligible_reads_one(bundle):
    full = load_bundle(bundle)
    meter.start(full)
    full.model(mx.array([IDS]))
    assert meter.read(full) == pytest.approx(1.0)
    meter.stop(full)
    assert meter.read(full) is None


def test_one_token_steps_meter_too(bundle):
    node = load_bundle(bundle, 0)
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(node.model)
    node.model(mx.array([IDS[:-1]]), cache=cache)
    meter.start(node)
    node.model(mx.array([IDS[-1:]]), cache=cache)  # one token: the fused step gives way to the gate
    v = meter.read(node)
    assert v is not None and 0 < v <= 1


def test_batched_rows_and_session_meter(bundle):
    node = load_bundle(bundle, 0)
    q = meter.start(node)
    node.model(mx.array([IDS[:4], IDS[4:]]))
    rows = meter.read_rows(node)
    assert len(rows) == 2 and all(0 < r <= 1 for r in rows)
    assert meter.read_rows(node) is None and q.shares == []
    sm = meter.SessionMeter()
    assert sm.stats() == {"quality_meter": None, "quality_meter_turns": 0}
    sm.add(0.5), sm.add(1.0, tokens=3), sm.add(None)
    sm.end_turn()
    sm.end_turn()  # a turn with nothing metered changes nothing
    assert sm.stats() == {"quality_meter": 0.875, "quality_meter_turns": 1}
