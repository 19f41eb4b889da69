"""Smoke test of the benchmark harness on a tiny config (figures are never asserted as timings)."""

import json

from gemma_jax import bench, cli


def test_bench_harness_end_to_end(tmp_path, capsys):
    code = cli.main(["--no-compile-cache", "bench", "--preset", "tiny", "--batch", "1,2", "--prompt-len", "20",
                     "--gen-len", "6", "--sliding-window", "8", "--repeats", "2", "--vs-hf", "--json", str(tmp_path / "b.json"),
                     "--plot", str(tmp_path / "b.png")])
    assert code == 0
    out = capsys.readouterr().out
    assert "gemma_jax on cpu" in out and "HF transformers" in out
    result = json.loads((tmp_path / "b.json").read_text())
    ours, hf = result["gemma_jax"], result["hf"]
    assert [r["batch"] for r in ours["runs"]] == [1, 2] == [r["batch"] for r in hf["runs"]]
    # identical synthetic weights on both sides: the same greedy tokens
    assert result["ratios"][0]["same_greedy_tokens"] is True
    run = ours["runs"][0]
    assert run["bytes_per_step"]["weights"] > 0 and 0 < run["roofline_fraction"]
    assert ours["bandwidth_GBps"] > 0 and ours["peak_rss_GiB"] > 0
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_bench_refuses_bad_arguments(capsys):
    assert cli.main(["bench", "--batch", "x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert cli.main(["bench", "--ckpt", "/nonexistent", "--vs-hf"]) == 2
    capsys.readouterr()
    assert cli.main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_synthetic_weights_are_deterministic():
    a = bench.synthetic_tensor("model.layers.0.mlp.up_proj.weight", (4, 3), seed=1)
    b = bench.synthetic_tensor("model.layers.0.mlp.up_proj.weight", (4, 3), seed=1)
    c = bench.synthetic_tensor("model.layers.1.mlp.up_proj.weight", (4, 3), seed=1)
    assert (a == b).all() and not (a == c).all()
