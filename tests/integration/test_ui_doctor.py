import hashlib
import json
import sys
import types

import pytest
from click.testing import CliRunner

from mlxmoe.bundle.manifest import Manifest
from mlxmoe.ui import doctor
from mlxmoe.commands.doctor import doctor_cmd
from ui_fake_server import FakeRouter, sample_status


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("MLXMOE_CLUSTER_KEY_FILE", raising=False)
    return tmp_path


def write_key(path, mode=0o600, text="ab" * 32):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def make_bundle(d, trunk_bytes=b"abc"):
    d.mkdir()
    m = Manifest(model={"id": "tiny-moe"}, moe={"moe_layers": [0], "top_k": 1, "n_experts": 2}, n_groups=2,
                 grouping={"layers": {"0": [[0], [1]]}}, overlay={"layers": {}}, quantization={},
                 files={"trunk.safetensors": {"sha256": hashlib.sha256(b"abc").hexdigest(), "size": 3,
                                              "role": "trunk"}})
    m.save(d)
    if trunk_bytes is not None:
        (d / "trunk.safetensors").write_bytes(trunk_bytes)
    return m


def test_key_checks(home, monkeypatch):
    c = doctor.check_key()
    assert c.status == "fail" and "mlxmoe init" in c.fix
    key = write_key(home / ".config" / "mlxmoe" / "cluster.key", 0o644)
    c = doctor.check_key()
    assert c.status == "fail" and "mode 644" in c.detail and c.fix == f"chmod 600 {key}"
    key.chmod(0o600)
    assert doctor.check_key().status == "ok"
    write_key(key, text="not hex")
    assert doctor.check_key().status == "fail"
    other = write_key(home / "elsewhere.key")
    monkeypatch.setenv("MLXMOE_CLUSTER_KEY_FILE", str(other))
    c = doctor.check_key()
    assert c.status == "ok" and str(other) in c.detail


def test_mlx_backends(monkeypatch):
    real = doctor.check_mlx()  # whatever this machine has: never raises
    assert real.status in ("ok", "warn") and "backend" in real.detail

    def fake_mlx(metal: bool, cuda: bool):
        core = types.SimpleNamespace(__version__="9.9", default_device=lambda: "Device(gpu, 0)",
                                     metal=types.SimpleNamespace(is_available=lambda: metal),
                                     cuda=types.SimpleNamespace(is_available=lambda: cuda))
        pkg = types.ModuleType("mlx")
        pkg.core = core
        monkeypatch.setitem(sys.modules, "mlx", pkg)
        monkeypatch.setitem(sys.modules, "mlx.core", core)

    fake_mlx(True, False)
    c = doctor.check_mlx()
    assert c.status == "ok" and "backend Metal" in c.detail
    fake_mlx(False, True)
    assert "backend CUDA" in doctor.check_mlx().detail
    fake_mlx(False, False)
    monkeypatch.setattr(sys, "platform", "darwin")
    c = doctor.check_mlx()
    assert c.status == "warn" and "arm64" in c.fix
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # import fails
    c = doctor.check_mlx()
    assert c.status == "fail" and "pip install mlx" in c.fix


def test_memory(monkeypatch):
    import psutil
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=64 * 2**30, available=2**30))
    c = doctor.check_memory()
    assert c.status == "warn" and c.detail == "64.0 GiB total, 1.0 GiB available"
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=64 * 2**30, available=40 * 2**30))
    assert doctor.check_memory().status == "ok"


def test_mdns(monkeypatch):
    import zeroconf

    class Broken:
        def __init__(self, *a, **k):
            raise OSError("no multicast interface")

    monkeypatch.setattr(zeroconf, "Zeroconf", Broken)
    c = doctor.check_mdns()
    assert c.status == "warn" and "no multicast interface" in c.detail and "Local Network" in c.fix

    class Closes:
        closed = False

        def close(self):
            Closes.closed = True

    monkeypatch.setattr(zeroconf, "Zeroconf", Closes)
    assert doctor.check_mdns().status == "ok" and Closes.closed


def test_cluster_checks(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # a demo running on this machine is not "the default"
    checks, status = doctor.check_cluster("http://127.0.0.1:9")
    assert status is None and checks[0].status == "fail" and "mlxmoe serve" in checks[0].fix
    monkeypatch.setattr(doctor, "DEFAULT_URL", "http://127.0.0.1:9")
    assert doctor.check_cluster(None)[0][0].status == "warn"  # nothing at the default address: maybe no router yet
    with FakeRouter() as srv:
        checks, status = doctor.check_cluster(srv.url)
    assert [c.status for c in checks] == ["ok", "ok"] and "3/3 peers up" in checks[0].detail
    st = sample_status()
    st["peers"][1].update(state="ignored", reason="manifest hash differs", manifest_hash="other")
    st["peers"][2].update(state="down", reason="no answer for 10 s")
    with FakeRouter(status=st) as srv:
        checks, _ = doctor.check_cluster(srv.url)
    by_name = {c.name: c for c in checks}
    assert by_name["peer mac-1"].status == "warn" and "manifest hash differs" in by_name["peer mac-1"].detail
    assert by_name["peer mac-2"].status == "warn"
    assert by_name["manifests"].status == "fail" and "mac-1" in by_name["manifests"].detail
    st["peers"] = [dict(st["peers"][2])]
    with FakeRouter(status=st) as srv:
        checks, _ = doctor.check_cluster(srv.url)
    assert any(c.name == "peers" and c.status == "fail" for c in checks)


def test_bundle_checks(tmp_path):
    m = make_bundle(tmp_path / "ok")
    checks = doctor.check_bundle(str(tmp_path / "ok"), m.hash)
    assert [c.status for c in checks] == ["ok", "ok"] and m.hash in checks[0].detail
    checks = doctor.check_bundle(str(tmp_path / "ok"), "another-hash")
    assert checks[-1].name == "bundle vs cluster" and checks[-1].status == "fail"
    make_bundle(tmp_path / "missing", trunk_bytes=None)
    checks = doctor.check_bundle(str(tmp_path / "missing"))
    assert checks[-1].status == "fail" and "trunk.safetensors: missing" in checks[-1].detail
    make_bundle(tmp_path / "short", trunk_bytes=b"a")
    assert "size 1 does not match" in doctor.check_bundle(str(tmp_path / "short"))[-1].detail
    checks = doctor.check_bundle(str(tmp_path / "nothing"))
    assert checks[0].status == "fail" and "not found" in checks[0].detail
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "distribution.json").write_text("{nope")
    assert "not valid JSON" in doctor.check_bundle(str(tmp_path / "junk"))[0].detail


def test_bundle_check_finds_a_bit_flip(tmp_path):
    """Sizes alone pass a flipped bit that the node then refuses: doctor hashes."""
    make_bundle(tmp_path / "flip", trunk_bytes=b"abd")
    checks = doctor.check_bundle(str(tmp_path / "flip"))
    c = checks[-1]
    assert c.name == "bundle files" and c.status == "fail"
    assert str(tmp_path / "flip" / "trunk.safetensors") in c.detail and "sha256 does not match" in c.detail
    assert "copy trunk.safetensors again" in c.fix and "mlxmoe copy" in c.fix


def test_bundle_check_shows_progress_while_hashing(tmp_path, monkeypatch):
    import io

    from mlxmoe import progress as progress_mod

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    monkeypatch.setattr(sys, "stderr", out)
    make_bundle(tmp_path / "b")
    assert [c.status for c in doctor.check_bundle(str(tmp_path / "b"), progress_mode="bar")] == ["ok", "ok"]
    assert "checking sha256" in out.getvalue() and progress_mod.is_terminal(out)


def all_ok(monkeypatch):
    for name in ("check_mlx", "check_cpu_blas", "check_memory", "check_mdns", "check_key", "check_cert"):
        monkeypatch.setattr(doctor, name, lambda n=name: doctor.Check(n, "ok", "fine"))


def test_doctor_command_exit_codes(home, monkeypatch, tmp_path):
    all_ok(monkeypatch)
    m = make_bundle(tmp_path / "b")
    st = sample_status()
    st["manifest_hash"] = m.hash
    for p in st["peers"]:
        p["manifest_hash"] = m.hash
    with FakeRouter(status=st) as srv:
        r = CliRunner().invoke(doctor_cmd, ["--url", srv.url, "--bundle", str(tmp_path / "b")])
        assert r.exit_code == 0, r.output
        assert "all good" in r.output and "✓ ok" in r.output
        r = CliRunner().invoke(doctor_cmd, ["--url", srv.url, "--json"])
        assert r.exit_code == 0
        out = json.loads(r.output)
        assert out["ok"] is True and {c["name"] for c in out["checks"]} >= {"router", "manifests"}
    monkeypatch.setattr(doctor, "check_key", lambda: doctor.Check("cluster key", "fail", "no key", "run `mlxmoe init`"))
    r = CliRunner().invoke(doctor_cmd, ["--url", "http://127.0.0.1:9"])
    assert r.exit_code == 1
    assert "✗ fail  cluster key: no key" in r.output and "fix: run `mlxmoe init`" in r.output
    assert "2 failed" in r.output


def test_moe_path_check_names_the_path_a_node_takes():
    c = doctor.check_moe_path()  # CPU here: the float32 reference path
    assert c.status == "ok" and c.detail.startswith("reference")
