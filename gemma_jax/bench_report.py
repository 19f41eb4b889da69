"""What `gemma-jax bench` prints and plots from bench.run's figures, and the number formats its
progress lines share."""

from __future__ import annotations

from pathlib import Path

from gemma_jax import cpuinfo


def count_text(n: int) -> str:
    """2.61 B, 4.19 M, 181 k."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def duration_text(seconds: float) -> str:
    """Seconds in a unit that shows them: 45 us, 12.3 ms, 1.90 s, 50 s, 2.2 min."""
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    if seconds >= 10:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def bytes_text(n: float, binary: bool = False) -> str:
    """Bytes in a unit that shows them: 512 kB, 10.5 GB (binary: KiB, MiB, GiB)."""
    base, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "kB", "MB", "GB", "TB"))
    for unit in units:
        if abs(n) < base * 0.9995 or unit == units[-1]:
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= base
    raise AssertionError("unreachable")


def rate_text(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def emulated_bf16(side: dict) -> bool:
    """bf16 on a CPU is emulated by XLA: compute-bound, so a bandwidth roofline says nothing."""
    return side.get("device") == "cpu" and side.get("dtype") == "bfloat16"


def _roofline(side: dict, r: dict) -> str:
    if emulated_bf16(side):
        return "no roofline (bf16 is emulated on CPU: compute-bound, not bandwidth-bound)"
    text = f"roofline {rate_text(r['roofline_tok_s'])} tok/s -> {100 * r['roofline_fraction']:.0f}%"
    if r["roofline_fraction"] > 1:
        text += " (over 100%: the probe under-read the bandwidth in this run)"
    return text


def _side_line(title: str, side: dict) -> str:
    return f"{title}: load {duration_text(side['load_s'])}, peak RSS {bytes_text(side['peak_rss_GiB'] * 2**30, binary=True)}"


def _versus_line(r: dict, ratio: dict, who: str, ttft: bool = False, suffix: str = "") -> str:
    """One run of a reference side, and how `who` compares with it."""
    head = f"  batch {r['batch']}, prompt {r['prompt_len']}: " + (f"TTFT {duration_text(r['ttft_s'])}, " if ttft else "")
    return (head + f"prefill {rate_text(r['prefill_tok_s'])} tok/s, decode {rate_text(r['decode_tok_s_per_seq'])} tok/s/seq "
            f"-> {who} is {ratio['decode_speedup']:.2f}x decode, {ratio['prefill_speedup']:.2f}x prefill" + suffix)


def format_report(result: dict) -> str:
    ours = result["gemma_jax"]
    lines = [cpuinfo.describe()]
    lines += [f"gemma_jax on {ours['device']} ({ours.get('weights', ours['dtype'])}): load {duration_text(ours['load_s'])}, "
              f"measured bandwidth {ours['bandwidth_GBps']:.3g} GB/s, "
              f"peak RSS {bytes_text(ours['peak_rss_GiB'] * 2**30, binary=True)}"]
    for r in ours["runs"]:
        lines.append(f"  batch {r['batch']}, prompt {r['prompt_len']}: compile {duration_text(max(r['compile_s'], 0))}, "
                     f"TTFT {duration_text(r['ttft_s'])}, prefill {rate_text(r['prefill_tok_s'])} tok/s, "
                     f"decode {rate_text(r['decode_tok_s_per_seq'])} tok/s/seq ({rate_text(r['decode_tok_s_total'])} total), "
                     f"{bytes_text(r['bytes_per_step']['total'])}/step, {_roofline(ours, r)}")
    if "hf" in result:
        hf = result["hf"]
        lines.append(_side_line(f"HF transformers {hf['version']} eager ({hf['dtype']}, {hf['threads']} threads)", hf))
        lines += [_versus_line(r, ratio, "gemma_jax", ttft=True,
                               suffix=f", same greedy tokens: {ratio['same_greedy_rows']}/{r['batch']} rows")
                  for r, ratio in zip(hf["runs"], result["ratios"])]
    if "float" in result:
        flt = result["float"]
        lines.append(_side_line(f"gemma_jax with {flt['weights']} weights (same run)", flt))
        lines += [_versus_line(r, ratio, ours["weights"]) for r, ratio in zip(flt["runs"], result["int8_ratios"])]
    return "\n".join(lines)


def model_name(spec: dict) -> str:
    """The checkpoint's directory name, or the preset's shape."""
    if spec.get("ckpt"):
        return Path(spec["ckpt"]).name or str(spec["ckpt"])
    return f"Gemma 2 {spec['preset']} shape, random weights"


def plot(result: dict, path: str):
    """Decode tokens/s (all sequences) against batch size: one line per side and prompt length.
    Returns the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    spec, ours = result["spec"], result["gemma_jax"]
    prompt_lens = sorted({r["prompt_len"] for r in ours["runs"]})
    batches = sorted({r["batch"] for r in ours["runs"]})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for side, (key, label, style) in enumerate((("gemma_jax", "gemma_jax", "o-"),
                                                ("hf", "HF transformers (eager)", "s--"))):
        if key not in result:
            continue
        for i, plen in enumerate(prompt_lens):
            points = sorted((r["batch"], r["decode_tok_s_total"]) for r in result[key]["runs"]
                            if r["prompt_len"] == plen)
            ax.plot(*zip(*points), style, color=colors[(side * len(prompt_lens) + i) % len(colors)],
                    label=label + (f", prompt {plen}" if len(prompt_lens) > 1 else ""))
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(bottom=0)
    ax.set(xlabel="batch size", ylabel="decode tokens/s (all sequences)")
    ax.set_title(f"{model_name(spec)}: {spec['dtype']} decode on {ours['device']}"
                 + (f", prompt {prompt_lens[0]}" if len(prompt_lens) == 1 else ""), fontsize=10)
    if emulated_bf16(ours):
        fig.text(0.01, 0.01, "bf16 on CPU is emulated (compute-bound): use float32 on CPUs", fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
