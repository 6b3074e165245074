"""Bootstrap intervals (quality/intervals.py) on distributions with known
answers, and the CPU BLAS verdict (quality/blas.py) as a pure decision."""

import numpy as np

from mlxmoe.quality import blas
from mlxmoe.quality import intervals as ci


def test_interval_of_a_normal_mean_has_the_textbook_width():
    x = np.random.default_rng(1).normal(1.0, 2.0, size=400)
    lo, hi = ci.bootstrap_mean(x)
    assert lo < x.mean() < hi
    assert abs((hi - lo) - 2 * 1.96 * 2.0 / 20) < 0.08  # 1.96 sigma / sqrt(n) each side


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    hits = [lo <= 0.0 <= hi for lo, hi in (ci.bootstrap_mean(rng.exponential(1.0, 60) - 1.0, resamples=400)
                                            for _ in range(200))]
    assert 0.85 <= np.mean(hits) <= 0.99


def test_fixed_seed_gives_the_same_interval_and_strata_keep_their_weight():
    x = np.random.default_rng(3).normal(size=50)
    assert ci.bootstrap_mean(x) == ci.bootstrap_mean(x)
    # two domains of constants, one much bigger: the balanced mean is exactly 5 in every resample
    vals, doms = np.r_[np.zeros(90), np.full(10, 10.0)], ["a"] * 90 + ["b"] * 10
    assert ci.bootstrap_mean(vals, doms) == [5.0, 5.0]


def test_ratio_of_sums_per_stratum():
    draws = ci.resample_indices(["a", "a", "b"], resamples=5)
    r = ci.ratio_of_sums([2.0, 4.0, 9.0], [1.0, 2.0, 3.0], draws)  # both "a" passages have ratio 2, "b" 3
    assert r.shape == (5, 2) and np.allclose(r[:, 0], 2.0) and np.allclose(r[:, 1], 3.0)


def result(gflops, platform="linux", device="Device(cpu, 0)", preload=""):
    return {"ms": 1.0, "gflops": gflops, "device": device, "platform": platform, "preload": preload}


def test_blas_verdict_warns_only_for_a_slow_linux_cpu_and_says_the_fix():
    status, detail, fix = blas.verdict(result(1.2))
    assert status == "warn" and "reference BLAS" in detail and "LD_PRELOAD has no OpenBLAS" in detail
    assert "apt-get install libopenblas0-pthread" in fix and "LD_PRELOAD=" + blas.OPENBLAS in fix
    assert blas.verdict(result(20.0, preload=blas.OPENBLAS))[0] == "ok"
    assert "OpenBLAS preloaded" in blas.verdict(result(20.0, preload=blas.OPENBLAS))[1]
    assert blas.verdict(result(1.2, platform="darwin"))[0] == "ok"  # Accelerate on macOS
    assert blas.verdict(result(1.2, device="Device(gpu, 0)"))[0] == "ok"


def test_doctor_reports_the_blas_check(monkeypatch):
    from mlxmoe.ui import doctor

    monkeypatch.setattr(blas, "measure", lambda: result(0.9))
    c = doctor.check_cpu_blas()
    assert c.name == "cpu blas" and c.status == "warn" and "libopenblas0-pthread" in c.fix
    monkeypatch.setattr(blas, "measure", lambda: 1 / 0)
    assert doctor.check_cpu_blas().status == "warn"  # never raises
