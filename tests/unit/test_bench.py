import json
from pathlib import Path

from click.testing import CliRunner

from mlxmoe.cli import main

REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"


def test_bench_prints_three_rows_with_ratios_memory_and_roofline(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--source", str(REFERENCE), "--prompt-tokens", "16", "--gen", "4",
                                  "--runs", "1", "--bandwidth", "10", "--workdir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in r.output.splitlines() if l.startswith("{")]
    assert [x["row"] for x in rows] == ["mlx-lm (full model)", "mlxmoe node, all experts", "mlxmoe node, group 0 of 3"]
    for x in rows:
        assert x["decode_tok_s"] > 0 and 0 < x["roofline_share"] < 1 and x["ratio_vs_mlx_lm"] > 0
        assert abs(x["weights_vs_expected"] - 1) < 0.05  # resident weights = trunk + group(s) files
    assert rows[2]["weights_bytes"] < 0.7 * rows[0]["weights_bytes"]
