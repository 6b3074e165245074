#!/usr/bin/env bash
# Run the tests that touch mlx-lm's APIs (private ones included: utils._get_classes,
# the KV cache classes' state/from_state) against each end of the pinned
# mlx-lm range. Each version goes alone into /tmp/mlxlm-VERSION (pip --no-deps
# --target) and comes FIRST on PYTHONPATH, so it shadows the installed mlx-lm
# while torch/transformers/mlx come from the current environment.
#   tools/check_mlx_lm_range.sh [VERSION ...]     (default: the range's ends)
# Record the output under benchmarks/ when the pin in pyproject.toml moves.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(0.32.0 0.32.2)
TESTS=(tests/unit/test_runtime.py tests/unit/test_split.py tests/unit/test_fused_kernels.py
       tests/unit/test_reference_model.py tests/unit/test_bench.py
       tests/integration/test_remote_experts.py tests/integration/test_cluster_node.py)
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "pin: $(grep -o '"mlx-lm[^"]*"' pyproject.toml)"
echo "mlx: $(python3 -c 'import importlib.metadata as m; print(m.version("mlx"))')"
rc=0
for v in "${VERSIONS[@]}"; do
  dir=/tmp/mlxlm-$v
  [ -d "$dir/mlx_lm" ] || python3 -m pip install -q --root-user-action=ignore --no-deps --target "$dir" "mlx-lm==$v" 2> >(grep -v "^WARNING: Location" >&2)
  echo "== mlx-lm $v"
  # mlx-lm's own mlx requirement must admit the installed mlx
  PYTHONPATH=$dir python3 - <<'EOF'
import importlib.metadata as m, mlx_lm
from packaging.requirements import Requirement
need = [Requirement(r) for r in m.requires("mlx-lm") if r.startswith("mlx")]
have = m.version("mlx")
print(f"mlx_lm {m.version('mlx-lm')} from {mlx_lm.__file__}")
bad = [str(r) for r in need if r.name == "mlx" and not r.specifier.contains(have, prereleases=True)]
print(f"mlx requirement {sorted({str(r.specifier) for r in need})} vs mlx {have}: {'NOT MET ' + str(bad) if bad else 'ok'}")
assert not bad
EOF
  PYTHONPATH=$dir:$ROOT python3 -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 | tail -3 || rc=1
done
exit $rc
