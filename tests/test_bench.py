"""Smoke test of the benchmark harness on a tiny config (figures are never asserted as timings),
and the report and plot on made-up figures."""

import json

import pytest

from gemma_jax import bench, bench_report, cli
from gemma_jax.config import gemma2_2b
from gemma_jax.model import param_count


def test_bench_harness_end_to_end(tmp_path, capsys):
    code = cli.main(["--no-compile-cache", "bench", "--preset", "tiny", "--batch", "1,2", "--prompt-len", "20",
                     "--gen-len", "6", "--sliding-window", "8", "--repeats", "2", "--vs-hf", "--json", str(tmp_path / "b.json"),
                     "--plot", str(tmp_path / "b.png")])
    assert code == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "gemma_jax on cpu" in out and "HF transformers" in out
    # said before it starts, and progress as plain lines although stderr is not a terminal here
    assert err.startswith("bench: random weights in the Gemma 2 tiny shape:")
    assert "bench: gemma_jax: batch 2, prompt 20: decode " in err and "bench: HF transformers: batch 2" in err
    result = json.loads((tmp_path / "b.json").read_text())
    ours, hf = result["gemma_jax"], result["hf"]
    assert [r["batch"] for r in ours["runs"]] == [1, 2] == [r["batch"] for r in hf["runs"]]
    # identical synthetic weights on both sides: the same greedy tokens, at every batch size
    assert [r["same_greedy_rows"] for r in result["ratios"]] == [1, 2]
    assert "same greedy tokens: 1/1 rows" in out and "same greedy tokens: 2/2 rows" in out
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


def test_plan_says_what_the_default_run_needs():
    """`gemma-jax bench` with no flags: a 2B-shaped float32 model; its size from eval_shape."""
    text = bench.plan(bench.BenchSpec())
    params = param_count(gemma2_2b())
    assert f"random weights in the Gemma 2 2b shape: {params / 1e9:.3g} B parameters in float32 " \
           f"({params * 4 / 1e9:.3g} GB)" in text
    gib = float(text.split("needs about ")[1].split(" GiB")[0])
    assert params * 4 / 2**30 < gib < params * 4 / 2**30 + 6         # weights, the probe, generation buffers
    assert "roughly" in text and "--preset tiny" in text
    slower = bench.plan(bench.BenchSpec(batch_sizes=(1, 4)), vs_hf=True)
    assert "then HF transformers on the same weights" in slower
    minutes = [float(t.split("roughly ")[1].split(" min")[0]) for t in (text, slower)]
    assert minutes[1] > minutes[0]


def _side(device, dtype, runs, **extra):
    return {"device": device, "dtype": dtype, "load_s": 0.0004, "bandwidth_GBps": 30.0, "peak_rss_GiB": 0.0004,
            "runs": runs, **extra}


def _run(batch, prompt_len, total):
    return {"batch": batch, "prompt_len": prompt_len, "gen_len": 8, "compile_s": 0.0031, "ttft_s": 0.00042,
            "prefill_tok_s": 50000.0, "decode_tok_s_per_seq": total / batch, "decode_tok_s_total": total,
            "bytes_per_step": {"weights": 2400, "cache": 100, "total": 2500}, "roofline_tok_s": 1000.0,
            "roofline_fraction": total / batch / 1000.0, "tokens": [[1] * 8] * batch}


@pytest.fixture
def made_up():
    """Figures of a bf16 run on CPU: 3 batch sizes x 2 prompt lengths, both sides."""
    grid = [(b, p) for b in (1, 4, 16) for p in (64, 512)]
    ours = _side("cpu", "bfloat16", [_run(b, p, 1500.0 * b / (1 + p / 512)) for b, p in grid])
    hf = _side("cpu", "bfloat16", [_run(b, p, 700.0 * b / (1 + p / 512)) for b, p in grid], version="5", threads=2)
    ratios = [{"batch": b, "prompt_len": p, "decode_speedup": 2.1, "prefill_speedup": 1.3,
               "same_greedy_tokens": b != 16, "same_greedy_rows": b if b != 16 else 15} for b, p in grid]
    spec = {"preset": "2b", "ckpt": "/ckpts/gemma-2-2b-jpn-it", "dtype": "bfloat16"}
    return {"spec": spec, "gemma_jax": ours, "hf": hf, "ratios": ratios}


def test_report_units_and_emulated_bf16(made_up):
    text = bench_report.format_report(made_up)
    assert "0.00" not in text
    assert "load 400 us" in text and "TTFT 420 us" in text and "compile 3.1 ms" in text
    assert "2.5 kB/step" in text and "peak RSS 419 KiB" in text
    assert "no roofline (bf16 is emulated on CPU" in text and "%" not in text
    assert "same greedy tokens: 15/16 rows" in text and "same greedy tokens: 4/4 rows" in text
    float32 = {**made_up, "gemma_jax": {**made_up["gemma_jax"], "dtype": "float32"}}
    assert "(over 100%: the probe under-read" in bench_report.format_report(float32)   # batch 1: 1.4x the roofline


def test_plot_title_lines_and_ticks(made_up, tmp_path):
    import matplotlib.pyplot as plt
    fig = bench_report.plot(made_up, str(tmp_path / "p.png"))
    ax = fig.axes[0]
    assert ax.get_title() == "gemma-2-2b-jpn-it: bfloat16 decode on cpu"
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["gemma_jax, prompt 64", "gemma_jax, prompt 512", "HF transformers (eager), prompt 64",
                      "HF transformers (eager), prompt 512"]
    assert list(ax.get_xticks()) == [1, 4, 16] and [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16"]
    assert list(ax.get_lines()[0].get_xdata()) == [1, 4, 16]
    assert any("emulated" in t.get_text() for t in fig.texts)
    assert (tmp_path / "p.png").stat().st_size > 1000
    plt.close(fig)
    one = {**made_up, "spec": {"preset": "2b", "ckpt": None, "dtype": "float32"}}
    del one["hf"]
    one["gemma_jax"] = {**one["gemma_jax"], "dtype": "float32",
                        "runs": [r for r in made_up["gemma_jax"]["runs"] if r["prompt_len"] == 64]}
    fig = bench_report.plot(one, str(tmp_path / "q.png"))
    assert fig.axes[0].get_title() == "Gemma 2 2b shape, random weights: float32 decode on cpu, prompt 64"
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["gemma_jax"] and not fig.texts
    plt.close(fig)


def test_synthetic_weights_are_deterministic():
    a = bench.synthetic_tensor("model.layers.0.mlp.up_proj.weight", (4, 3), seed=1)
    b = bench.synthetic_tensor("model.layers.0.mlp.up_proj.weight", (4, 3), seed=1)
    c = bench.synthetic_tensor("model.layers.1.mlp.up_proj.weight", (4, 3), seed=1)
    assert (a == b).all() and not (a == c).all()
