"""The recommendation's forms exist where they are pasted: every llama-server flag in llama.cpp's argument table
(tests/data/llama_server_args.json, read from the vendored common/arg.cpp by tests/lcp_args.py), with
llama-server's separators; every Ollama PARAMETER among Ollama's documented options
(tests/data/ollama_parameters.json, sources cited there); every Llama(**kwargs) name a Llama() parameter."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
from pathlib import Path

import pytest
from lcp_args import server_table

from tuner.record import TrialConfig, moe_part_pattern, parse_tensor_split
from tuner.search.recommend import forms

DATA = Path(__file__).parent / "data"
TABLE = json.loads((DATA / "llama_server_args.json").read_text())
OLLAMA = json.loads((DATA / "ollama_parameters.json").read_text())
VENDORED = Path(os.environ.get("TUNER_LLAMA_CPP_SOURCE", "/work/ref/lcp/vendor/llama.cpp"))
NAMED = ("-fa", "-lm", "-sm", "-ctk", "-ctv", "-fit")  # flags whose values forms spells by name
INTS = ("-ngl", "-c", "-t", "-tb", "-b", "-ub", "-mg", "--n-cpu-moe", "-np")

M = "/models/m.gguf"
CONFIGS = {
    "defaults": TrialConfig(model=M),
    "threads and batches": TrialConfig(model=M, n_threads=6, n_threads_batch=12, n_batch=1024, n_ubatch=256),
    "kv types and flash attention": TrialConfig(model=M, type_k="q8_0", type_v="q4_0", flash_attn="on"),
    "flash attention off, iq4_nl keys": TrialConfig(model=M, flash_attn="off", type_k="iq4_nl"),
    "no mmap": TrialConfig(model=M, use_mmap=False),
    "mlock": TrialConfig(model=M, use_mlock=True),
    "mlock without mmap": TrialConfig(model=M, use_mmap=False, use_mlock=True),
    "tensor split (llama-bench spelling)": TrialConfig(model=M, tensor_split="3/1", split_mode="row", main_gpu=1),
    "tensor split of three": TrialConfig(model=M, tensor_split="1,1,0.5"),
    "split mode none": TrialConfig(model=M, split_mode="none", main_gpu=1),
    "overrides": TrialConfig(model=M, overrides=(r"blk\.1[0-9]\.ffn_.*_exps\.=CPU", r"token_embd\.weight=CPU")),
    "n_cpu_moe": TrialConfig(model=M, n_gpu_layers=99, n_cpu_moe=12),
    "cpu_moe": TrialConfig(model=M, cpu_moe=True),
    # fit's partial-layer expert overrides (issue 34): one more -ot after --n-cpu-moe
    "n_cpu_moe and the next layer's down experts": TrialConfig(model=M, n_gpu_layers=99, n_cpu_moe=4, moe_part="down"),
    "gate+down of layer 0": TrialConfig(model=M, n_gpu_layers=99, moe_part="gate_down"),
    "whole FFN with overrides": TrialConfig(
        model=M, n_gpu_layers=99, n_cpu_moe=2, moe_part="ffn", overrides=(r"token_embd\.weight=CPU",)
    ),
    "rpc": TrialConfig(model=M, rpc="10.0.0.2:50052,10.0.0.3:50052", n_gpu_layers=40, tensor_split="2/1/1"),
    "everything": TrialConfig(
        model=M,
        n_gpu_layers=30,
        n_ctx=8192,
        n_threads=8,
        n_threads_batch=16,
        n_batch=4096,
        n_ubatch=1024,
        flash_attn="on",
        type_k="q8_0",
        type_v="q8_0",
        use_mmap=False,
        use_mlock=True,
        split_mode="layer",
        tensor_split="3/1",
        overrides=(r"blk\.2\.ffn_up_exps\.=CPU",),
        n_cpu_moe=3,
        rpc="host:50052",
    ),
}


def server_argv_problems(argv: list[str], table: dict = TABLE) -> list[str]:
    """What llama-server (of the table's source) would refuse or read otherwise in this command line."""
    flags, out = table["flags"], []
    if Path(argv[0]).name != "llama-server":
        out.append(f"not a llama-server command: {argv[0]}")
    i = 1
    while i < len(argv):
        flag = argv[i]
        spec = flags.get(flag)
        if spec is None:
            out.append(f"{flag}: no such llama-server option")
            i += 1
            continue
        if not spec["takes_value"]:
            i += 1
            continue
        if i + 1 >= len(argv):
            out.append(f"{flag}: no value")
            break
        value = argv[i + 1]
        i += 2
        if flag in NAMED and value not in spec.get("choices", ()):
            out.append(f"{flag} {value}: not one of {spec.get('choices')}")
        elif flag in INTS and not re.fullmatch(r"-?\d+", value):
            out.append(f"{flag} {value}: not an integer")
        elif flag == "-ts" and not re.fullmatch(r"\d+(\.\d+)?(,\d+(\.\d+)?)*", value):
            out.append(f"-ts {value}: llama-server separates the shares with ',' (llama-bench's '/' is its own)")
        elif flag == "-ot" and any(";" in x or "=" not in x for x in value.split(",")):
            out.append(f"-ot {value}: llama-server separates PATTERN=BUFFER entries with ',' (llama-bench: ';')")
        elif flag == "--rpc" and not re.fullmatch(r"[^,:\s]+:\d+(,[^,:\s]+:\d+)*", value):
            out.append(f"--rpc {value}: expected host:port,host:port")
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_server_line_has_only_flags_llama_server_has(name):
    cfg = CONFIGS[name]
    f = forms(cfg)
    argv = f["llama_server_argv"]
    assert shlex.split(f["llama_server"]) == argv  # the pasted line is the argument vector
    assert server_argv_problems(argv) == []
    # and it says what the config says, in llama-server's spelling
    pairs = dict(zip(argv[1::2], argv[2::2]))
    if cfg.tensor_split:
        assert [float(x) for x in argv[argv.index("-ts") + 1].split(",")] == parse_tensor_split(cfg.tensor_split)
    part = [] if cfg.moe_part == "none" or cfg.cpu_moe else [f"{moe_part_pattern(cfg.n_cpu_moe, cfg.moe_part)}=CPU"]
    assert [argv[j + 1] for j, a in enumerate(argv) if a == "-ot"] == [*cfg.overrides, *part]
    assert ("--cpu-moe" in argv) == cfg.cpu_moe
    assert pairs.get("--n-cpu-moe") == (str(cfg.n_cpu_moe) if cfg.n_cpu_moe else None)
    assert pairs.get("--rpc") == (cfg.rpc or None)
    assert pairs["-ctk"] == cfg.type_k and pairs["-ctv"] == cfg.type_v and pairs["-fa"] == cfg.flash_attn
    assert pairs["-t"] == str(cfg.n_threads) and pairs["-b"] == str(cfg.n_batch) and pairs["-ub"] == str(cfg.n_ubatch)
    mode = {(True, False): None, (False, False): "none", (True, True): "mmap+mlock", (False, True): "mlock"}
    assert pairs.get("-lm") == mode[(cfg.use_mmap, cfg.use_mlock)]


def test_the_checker_passes_llama_servers_own_spellings():
    # -ot entries joined with ',' (llama-server's separator; llama-bench uses ';'), -ts with ',', -fit off
    good = ["llama-server", "-m", M, "-ot", r"blk\.1\.ffn_down.*=CPU,token_embd\.weight=CPU", "-ts", "3,1"]
    good += ["--n-cpu-moe", "4", "-fit", "off", "-np", "4", "--kv-unified", "-lm", "none"]
    assert server_argv_problems(good) == []


def test_the_checker_fails_a_flag_llama_server_does_not_have():
    bad = ["llama-server", "-m", M, "--mmap", "-ts", "3/1", "-ot", "a=CPU;b=CPU", "-fa", "yes", "-ctk", "q4_k"]
    bad += ["-fit", "no", "--n-cpu-moe", "all"]
    problems = server_argv_problems(bad)
    assert len(problems) == 7, problems
    assert problems[0] == "--mmap: no such llama-server option"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ollama_parameters_are_ollamas(name):
    cfg = CONFIGS[name]
    lines = forms(cfg)["ollama_modelfile"].splitlines()
    assert lines[0] == f"FROM {M}"
    accepted = set(OLLAMA["runner_options_current"])
    assert accepted <= set(OLLAMA["options"])
    params = {}
    for line in lines[1:]:
        word, key, value = line.split(" ", 2)
        assert word == "PARAMETER" and key in accepted, line
        params[key] = value
    assert params["num_ctx"] == str(cfg.effective_ctx()) and params["num_gpu"] == str(cfg.n_gpu_layers)
    assert params["num_thread"] == str(cfg.n_threads) and params["num_batch"] == str(cfg.n_batch)
    assert params.get("use_mmap") == (None if cfg.use_mmap else "false")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_python_kwargs_are_llama_parameters(name):
    import llama_cpp

    kwargs = forms(CONFIGS[name])["llama_cpp_python"]
    assert set(kwargs) <= set(inspect.signature(llama_cpp.Llama.__init__).parameters)


@pytest.mark.skipif(
    not (VENDORED / "common" / "arg.cpp").is_file(),
    reason=f"no vendored llama.cpp source at {VENDORED} (TUNER_LLAMA_CPP_SOURCE)",
)
def test_committed_table_is_the_vendored_sources():
    """Regenerate with `python tests/lcp_args.py /work/ref/lcp/vendor/llama.cpp > tests/data/llama_server_args.json`
    when llama-cpp-python (and its vendored llama.cpp) is upgraded."""
    fresh = server_table(VENDORED)
    assert fresh["commit"] == TABLE["commit"]
    assert fresh["flags"] == TABLE["flags"]
    # the parser reads what llama-server's own help shows for the options forms uses
    for flag in ("-ngl", "-ts", "-ot", "--n-cpu-moe", "--cpu-moe", "--rpc", "-lm", "-np", "--host", "--port"):
        assert flag in fresh["flags"], flag
    assert fresh["flags"]["--cpu-moe"] == {"takes_value": False}
