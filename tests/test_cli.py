"""The command line: a refused input is one line on stderr and exit status 2; a bug is a traceback and 1.

Called in-process through `gemma_jax.cli.main` (stderr captured by capsys), plus two real
`python -m gemma_jax` runs for the exit status end to end.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemma_jax
from gemma_jax import cli, default
from gemma_jax.errors import CheckpointError, ConfigError
from hf_oracle import hf_model, save

ROOT = Path(__file__).resolve().parents[1]
CONVERT_MODULE = sys.modules["gemma_jax.convert"]   # `gemma_jax.convert` is the function


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny HF directory and its conversion (no tokenizer)."""
    root = tmp_path_factory.mktemp("cli")
    save(hf_model(seed=0), root / "hf")
    gemma_jax.convert(root / "hf", root / "ckpt")
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--no-compile-cache", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv: str, words: tuple[str, ...]) -> str:
    """Run argv; assert exit 2, nothing on stdout and exactly one `gemma-jax: error:` line."""
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-jax: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------- convert
def test_convert_missing_hf_dir(capsys, tmp_path):
    refused(capsys, "convert", tmp_path / "nope", tmp_path / "out",
            words=(f"{tmp_path / 'nope'}: no such directory",))
    assert list(tmp_path.iterdir()) == []


def test_convert_out_exists(capsys, tmp_path, dirs):
    (tmp_path / "out").mkdir()
    refused(capsys, "convert", dirs / "hf", tmp_path / "out", words=("already exists", "--force"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_convert_dtype_float16(capsys, tmp_path, dirs):
    refused(capsys, "convert", dirs / "hf", tmp_path / "out", "--dtype", "float16",
            words=("dtype 'float16' is not supported", "overflows"))
    assert list(tmp_path.iterdir()) == []


def test_convert_bad_tensor_names_the_file(capsys, tmp_path, dirs):
    shutil.copytree(dirs / "hf", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    refused(capsys, "convert", tmp_path / "hf", tmp_path / "out",
            words=(f"{path}: truncated safetensors file",))
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_convert_ok_and_float16_warning_is_one_line(capsys, tmp_path):
    save(hf_model(seed=2, dtype=torch.float16), tmp_path / "hf16")
    capsys.readouterr()   # transformers' own progress bar
    code, out, err = run(capsys, "convert", tmp_path / "hf16", tmp_path / "out")
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert lines[0].startswith("gemma-jax: warning: ") and "float16 weights: converting to float32" in lines[0]
    assert lines[1].startswith(f"wrote {tmp_path / 'out'} in ")
    assert lines[2] == (f"gemma-jax: warning: {tmp_path / 'hf16'} has no tokenizer.model, so {tmp_path / 'out'} "
                        "works on token ids only: copy the model's tokenizer.model into it for 'gemma-jax generate' "
                        "and 'chat'")
    assert json.loads((tmp_path / "out" / "gemma_config.json").read_text())["param_dtype"] == "float32"


# ----------------------------------------------------------------------------------------- generate
def test_generate_missing_ckpt(capsys, tmp_path):
    refused(capsys, "generate", "--ckpt", tmp_path / "nope", "--prompt", "hi",
            words=(f"{tmp_path / 'nope'}: no such checkpoint directory",))


def test_generate_on_hf_dir_hints_convert(capsys, dirs):
    refused(capsys, "generate", "--ckpt", dirs / "hf", "--prompt", "hi",
            words=("a Hugging Face model directory", "gemma-jax convert"))


def _copy_ckpt(dirs, tmp_path) -> Path:
    """A copy of the tiny checkpoint with a tokenizer.model (the default model's), so that the CLI
    goes on to load it."""
    shutil.copytree(dirs / "ckpt", tmp_path / "ckpt")
    shutil.copy(default.HF_DIR / "tokenizer.model", tmp_path / "ckpt" / "tokenizer.model")
    return tmp_path / "ckpt"


def _data_dirs(ckpt):
    """Orbax's array data directories inside a checkpoint's params/."""
    return sorted((ckpt / "params").glob("state/ocdbt.process_*/d"))


def test_generate_incomplete_ckpt(capsys, tmp_path, dirs):
    _copy_ckpt(dirs, tmp_path)
    shutil.rmtree(_data_dirs(tmp_path / "ckpt")[0])
    refused(capsys, "generate", "--ckpt", tmp_path / "ckpt", "--prompt", "hi",
            words=(f"{tmp_path / 'ckpt'}: incomplete checkpoint: params/state/ocdbt.process_",))


def test_generate_damaged_ckpt_without_file_list(capsys, tmp_path, dirs):
    """A checkpoint from before the file list: Orbax meets the damage, still one line."""
    _copy_ckpt(dirs, tmp_path)
    meta_path = tmp_path / "ckpt" / "gemma_config.json"
    meta = json.loads(meta_path.read_text())
    del meta["params_files"]
    meta_path.write_text(json.dumps(meta))
    for data in _data_dirs(tmp_path / "ckpt"):
        shutil.rmtree(data)
    refused(capsys, "generate", "--ckpt", tmp_path / "ckpt", "--prompt", "hi",
            words=(f"{tmp_path / 'ckpt' / 'params'}: incomplete or corrupt Orbax checkpoint",))


def test_generate_corrupt_params_is_one_line(capsys, tmp_path, dirs):
    """Orbax meets the damage (same size, so the file list passes); its own log line is kept quiet."""
    _copy_ckpt(dirs, tmp_path)
    for path in (p for data in _data_dirs(tmp_path / "ckpt") for p in data.iterdir()):
        path.write_bytes(bytes(path.stat().st_size))
    refused(capsys, "generate", "--ckpt", tmp_path / "ckpt", "--prompt", "hi",
            words=(f"{tmp_path / 'ckpt' / 'params'}: incomplete or corrupt Orbax checkpoint",))


@pytest.mark.parametrize("command,args,words", [
    ("generate", ("--temperature", "-1"), ("--temperature must be a finite number >= 0, got -1.0",)),
    ("generate", ("--top-p", "0"), ("--top-p must be in (0, 1], got 0.0",)),
    ("generate", ("--top-p", "1.5"), ("--top-p must be in (0, 1], got 1.5",)),
    ("generate", ("--top-k", "0"), ("--top-k must be an integer >= 1, got 0",)),
    ("generate", ("--max-new-tokens", "-1"), ("--max-new-tokens must be an integer >= 0, got -1",)),
    ("generate", ("--seed", "-1"), ("--seed must be an integer in [0, 4294967295], got -1",)),
    ("generate", ("--system", "be brief"), ("--system needs --chat",)),
    ("serve", ("--max-batch", "0"), ("--max-batch must be an integer >= 1, got 0",)),
    ("serve", ("--max-queue", "-1"), ("--max-queue must be an integer >= 0, got -1",)),
    ("serve", ("--min-decode-batch", "0"), ("--min-decode-batch must be an integer >= 1, got 0",)),
    ("serve", ("--decode-call-ms", "0"), ("--decode-call-ms must be a finite number > 0, got 0.0",)),
    ("serve", ("--decode-call-ms", "nan"), ("--decode-call-ms must be a finite number > 0, got nan",)),
    ("serve", ("--prefill-chunk", "48"), ("--prefill-chunk must be a power of two >= 16, got 48",)),
    ("serve", ("--port", "70000"), ("--port must be in [0, 65535], got 70000",)),
])
def test_bad_settings_refused_before_loading(capsys, dirs, monkeypatch, command, args, words):
    def no_load(*a, **k):
        raise AssertionError("loaded the model before checking the arguments")
    monkeypatch.setattr(gemma_jax.api, "load", no_load)
    source = ("--ckpt", dirs / "ckpt", "--prompt", "hi") if command == "generate" else ()
    refused(capsys, command, *source, *args, words=words)


def test_generate_without_tokenizer(capsys, dirs):
    refused(capsys, "generate", "--ckpt", dirs / "ckpt", "--prompt", "hi", words=("no tokenizer.model",))


@pytest.mark.parametrize("chat", [False, True])
def test_generate_too_long_for_the_context(capsys, chat_ckpt, chat):
    refused(capsys, "generate", "--ckpt", chat_ckpt, "--prompt", "hello", "--max-new-tokens", "100",
            *(["--chat"] if chat else []), words=("+ --max-new-tokens 100 exceeds", "max_position_embeddings 64"))


def test_chat_repl_reports_a_refused_turn_and_goes_on(capsys, chat_ckpt, monkeypatch):
    """A message that leaves no room for a reply is refused; the chat goes on (and answers the next)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello " * 70 + "\nhi\n/exit\n"))
    code, out, err = run(capsys, "chat", "--ckpt", chat_ckpt, "--max-new-tokens", "4")
    assert code == 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "leaves no room for a reply" in errors[0], err
    assert "max_position_embeddings 64" in errors[0] and out.count("model> ") == 1


# ----------------------------------------------------------------------------------------- usage
@pytest.mark.parametrize("argv,words", [
    ((), ("the following arguments are required: COMMAND",)),
    (("frobnicate",), ("invalid choice: 'frobnicate'",)),
    (("convert",), ("the following arguments are required: hf_dir, out_dir", "gemma-jax convert --help")),
    (("generate", "--ckpt", "x", "--prompt", "p", "--top-k", "many"), ("argument --top-k: invalid int value",)),
    (("generate", "--ckpt", "x", "--prompt", "p", "--dtype", "float16"), ("argument --dtype: invalid choice",)),
    (("chat", "--ckpt", "x", "--bogus"), ("unrecognized arguments: --bogus",)),
])
def test_usage_errors_are_one_line(capsys, argv, words):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-jax: error: "), err
    assert all(w in lines[0] for w in words), lines[0]


# ----------------------------------------------------------------------------------------- --debug, bugs
def test_debug_reraises(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        cli.main(["--debug", "--no-compile-cache", "convert", str(tmp_path / "nope"), str(tmp_path / "out")])


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_unexpected_exception_is_a_bug_exit_1(capsys, tmp_path, dirs, monkeypatch):
    monkeypatch.setattr(CONVERT_MODULE, "convert", _boom)
    code, out, err = run(capsys, "convert", dirs / "hf", tmp_path / "out")
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("gemma-jax: internal error: RuntimeError: boom")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", "--no-compile-cache", "convert", str(dirs / "hf"), str(tmp_path / "out")])


def test_unexpected_exception_during_conversion_leaves_nothing(capsys, tmp_path, dirs, monkeypatch):
    monkeypatch.setattr(gemma_jax.checkpoint, "save", _boom)
    code, _, err = run(capsys, "convert", dirs / "hf", tmp_path / "out")
    assert code == 1 and "RuntimeError: boom" in err
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_exits_130(capsys, tmp_path, dirs, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(gemma_jax.checkpoint, "save", interrupt)
    code, _, err = run(capsys, "convert", dirs / "hf", tmp_path / "out")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_unusable_compile_cache_is_a_warning(capsys, tmp_path, dirs):
    (tmp_path / "file").write_text("")
    code = cli.main(["--compile-cache", str(tmp_path / "file" / "xla"), "convert", str(dirs / "hf"),
                     str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert err.splitlines()[0].startswith(f"gemma-jax: warning: {tmp_path / 'file' / 'xla'}: cannot create")
    with pytest.raises(CheckpointError, match="already exists"):
        cli.main(["--debug", "--no-compile-cache", "convert", str(dirs / "hf"), str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("argv,words", [
    (("convert", "{tmp}/nope", "{tmp}/out"), ("{tmp}/nope: no such directory",)),
    (("generate", "--ckpt", "{hf}", "--prompt", "hi"), ("a Hugging Face model directory",)),
])
def test_python_m_gemma_jax_exit_status(tmp_path, dirs, argv, words):
    fill = lambda s: s.format(tmp=tmp_path, hf=dirs / "hf")  # noqa: E731
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "gemma_jax", "--no-compile-cache", *map(fill, argv)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-jax: error: "), proc.stderr
    assert all(fill(w) in lines[0] for w in words)


def test_generate_under_a_mesh(capsys, chat_ckpt):
    """--mesh lays the model out over the devices; on one device 1x1 gives the same text."""
    code, plain, _ = run(capsys, "generate", "--ckpt", chat_ckpt, "--prompt", "hi", "--max-new-tokens", "5")
    assert code == 0
    code, meshed, _ = run(capsys, "--mesh", "1x1", "generate", "--ckpt", chat_ckpt, "--prompt", "hi",
                          "--max-new-tokens", "5")
    assert code == 0 and meshed == plain


@pytest.mark.parametrize("mesh,words", [("2x2", "needs 4 devices"), ("x", "expected FSDPxTP")])
def test_bad_mesh(capsys, dirs, mesh, words):
    refused(capsys, "--mesh", mesh, "generate", "--ckpt", dirs / "ckpt", "--prompt", "hi", words=(words,))


# ----------------------------------------------------------------------------------------- parity
def test_parity_explains_a_bf16_checkpoint(capsys, dirs, tmp_path):
    """A bf16 conversion of float32 HF weights differs by bf16 rounding: parity fails and says why;
    transformers' progress bars stay quiet."""
    gemma_jax.convert(dirs / "hf", tmp_path / "bf16", dtype="bfloat16")
    code, out, err = run(capsys, "parity", "--hf", dirs / "hf", "--ckpt", tmp_path / "bf16", "--length", "8")
    assert code == 2 and "FAIL: logits differ" in out and "bf16 rounding of the weights explains" in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-jax: error: parity: logits differ from HF by "), err
    assert "> --tolerance 0.0002 (the checkpoint stores bfloat16 and the HF directory float32: bf16 rounding" in lines[0]


# ----------------------------------------------------------------------------------------- the parser
def test_global_flags_before_or_after_the_command(capsys, chat_ckpt):
    parser = cli.build_parser()
    before = parser.parse_args(["--debug", "--mesh", "1x1", "generate", "--prompt", "p"])
    after = parser.parse_args(["generate", "--prompt", "p", "--debug", "--mesh", "1x1"])
    plain = parser.parse_args(["generate", "--prompt", "p"])
    assert (before.debug, before.mesh) == (after.debug, after.mesh) == (True, "1x1")
    assert (plain.debug, plain.mesh, plain.compile_cache) == (False, None, cli.DEFAULT_COMPILE_CACHE)
    # every command gets them, one added later too
    commands = next(a for a in parser._actions if isinstance(a, cli._Commands))
    commands.add_parser("later", help="a command added by another module")
    assert parser.parse_args(["later", "--no-compile-cache"]).no_compile_cache is True
    code, out, _ = run(capsys, "generate", "--ckpt", chat_ckpt, "--prompt", "hi", "--max-new-tokens", "2", "--mesh", "1x1")
    assert code == 0 and out.startswith("hi")


def test_version_description_and_defaults_in_help(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gemma-jax {gemma_jax.__version__} " \
        f"(jax {importlib.metadata.version('jax')}, flax {importlib.metadata.version('flax')})"
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert f"Commands: {', '.join(cli.COMMANDS)}." in top
    assert cli.main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("most tokens to generate (default: 64)", "the same seed repeats the same sample (default: 0)",
                  "(repeatable)", "global options (before or after the command)", "--debug"):
        assert words in text, words
    assert "usage: gemma-jax generate [-h] [--ckpt DIR]" in text       # the usage line leaves the globals out
    assert cli.main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "random weights of this shape (default: 2b)" in text and "(default: 3)" in text


def test_paths_expand_the_home_directory(capsys, monkeypatch, dirs, tmp_path):
    """~ in a path: the CLI expands it (also in --flag=~/x, which the shell leaves alone), and so
    do convert and load."""
    monkeypatch.setenv("HOME", str(tmp_path))
    refused(capsys, "generate", "--ckpt=~/nope", "--prompt", "hi", words=(f"{tmp_path / 'nope'}: no such checkpoint",))
    gemma_jax.convert(dirs / "hf", "~/ckpt")
    assert (tmp_path / "ckpt" / "gemma_config.json").is_file()
    assert gemma_jax.load("~/ckpt").config == gemma_jax.load(dirs / "ckpt").config


def test_sampling_flags_without_a_temperature_warn(capsys, chat_ckpt):
    code, out, err = run(capsys, "generate", "--ckpt", chat_ckpt, "--prompt", "hi", "--max-new-tokens", "2",
                         "--top-k", "5")
    assert code == 0 and "gemma-jax: warning: --top-k and --top-p do nothing at --temperature 0 (greedy)" in err


def test_stop_and_empty_prompt(capsys, chat_ckpt):
    """--prompt "" continues from BOS alone; --stop (repeatable) ends the text at a string, not printed."""
    reference = gemma_jax.load(chat_ckpt).generate("", max_new_tokens=8)
    code, out, _ = run(capsys, "generate", "--ckpt", chat_ckpt, "--prompt", "", "--max-new-tokens", "8")
    assert code == 0 and out == reference + "\n" and len(reference) >= 4
    stop = reference[len(reference) // 2:len(reference) // 2 + 2]
    code, out, _ = run(capsys, "generate", "--ckpt", chat_ckpt, "--prompt", "", "--max-new-tokens", "8",
                       "--stop", "never there", "--stop", stop)
    assert code == 0 and out == reference[:reference.find(stop)] + "\n"
