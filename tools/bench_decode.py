"""Decode benchmark; the code is `mlxmoe bench` (mlxmoe/node/bench.py, the
command in mlxmoe/commands/bench.py).

    python tools/bench_decode.py --source mlxmoe/assets/reference-moe --prompt-tokens 128 --gen 64
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlxmoe.commands.bench import bench_cmd  # noqa: E402

if __name__ == "__main__":
    bench_cmd(prog_name="bench_decode.py")
