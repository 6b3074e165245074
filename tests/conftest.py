import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """ckpt(arch, **kw) -> path of a cached tiny HF checkpoint."""
    import tiny as t

    cache = {}

    def make(arch, **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = t.make_checkpoint(arch, tmp_path_factory.mktemp(arch), **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tls_identity():
    """The test session's cluster CA + a node certificate (cluster.tls.Identity)."""
    import fakes
    return fakes.test_identity()
