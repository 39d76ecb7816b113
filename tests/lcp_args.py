"""llama.cpp's argument table for llama-server, read from common/arg.cpp (no build needed).

Every option is an `add_opt(common_arg({"-x", "--xx"}, [{"--no-xx"},] [VALUE_HINT,] help, handler)
[.set_examples({...})] [.set_excludes({...})] ...)`; an option without set_examples is LLAMA_EXAMPLE_COMMON,
which every tool but llama-download inherits (common_params_parser_init's add_opt). llama-server accepts those
valid for LLAMA_EXAMPLE_SERVER or COMMON and not excluded from SERVER. An option takes a value when its
constructor has a value hint (a string literal before the help; a negatable flag `{"--x"}, {"--no-x"}` takes
none).

The table is committed as tests/data/llama_server_args.json (with the source's commit); test_forms.py checks it
against the vendored source when there is one. Regenerate:

    python tests/lcp_args.py /work/ref/lcp/vendor/llama.cpp > tests/data/llama_server_args.json
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SERVER = "LLAMA_EXAMPLE_SERVER"
COMMON = "LLAMA_EXAMPLE_COMMON"


def _skip_literal(src: str, i: int) -> int:
    """The index after the string or char literal (raw strings included) that starts at i."""
    if src.startswith('R"', i):
        j = src.index("(", i)
        delim = ")" + src[i + 2 : j] + '"'
        return src.index(delim, j) + len(delim)
    quote = src[i]
    i += 1
    while src[i] != quote:
        i += 2 if src[i] == "\\" else 1
    return i + 1


def _balanced(src: str, i: int) -> int:
    """The index after the bracket that closes the one at i, skipping literals and comments."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = [pairs[src[i]]]
    i += 1
    while stack:
        c = src[i]
        if src.startswith("//", i):
            i = src.index("\n", i)
        elif src.startswith("/*", i):
            i = src.index("*/", i) + 2
        elif c == '"' or src.startswith('R"', i) or (c == "'" and not src[i - 1].isalnum()):
            i = _skip_literal(src, i)
        else:
            if c in pairs:
                stack.append(pairs[c])
            elif c in ")}]":
                if c != stack.pop():
                    raise ValueError(f"unbalanced {c!r} at {i}")
            i += 1
    return i


def _top_level_args(text: str) -> list[str]:
    """The comma-separated arguments of a call's argument text, commas inside brackets and literals aside."""
    parts, start, i = [], 0, 0
    while i < len(text):
        c = text[i]
        if text.startswith("//", i) or text.startswith("/*", i):
            i = text.index("\n", i) if text.startswith("//", i) else text.index("*/", i) + 2
        elif c == '"' or text.startswith('R"', i) or (c == "'" and not text[i - 1].isalnum()):
            i = _skip_literal(text, i)
        elif c in "({[":
            i = _balanced(text, i)
        elif c == ",":
            parts.append(text[start:i].strip())
            start = i = i + 1
        else:
            i += 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _choices(rest: str, arg_cpp: str) -> list[str] | None:
    """The values an option's handler accepts, where it spells them: `value == "x"` comparisons, a hint
    "[a|b|c]" / "{a,b,c}", or the KV-cache types (kv_cache_type_from_str: ggml's names of kv_cache_types)."""
    if "kv_cache_type_from_str" in rest:
        body = re.search(r"kv_cache_types\s*=\s*\{(.*?)\};", arg_cpp, re.S).group(1)
        return [t.lower() for t in re.findall(r"GGML_TYPE_(\w+)", body)]
    found = re.findall(r'value\s*==\s*"([^"]*)"', rest)
    if found:
        return [v for v in dict.fromkeys(found) if v]
    hint = _strings(_top_level_args(rest)[0])
    if hint and (m := re.fullmatch(r"[\[{]([\w+|,-]+)[\]}]", hint[0])):
        return re.split(r"[|,]", m.group(1))
    return None


def _strings(text: str) -> list[str]:
    return re.findall(r'"((?:[^"\\]|\\.)*)"', text)


def options(arg_cpp: str) -> list[dict]:
    """Every add_opt(common_arg(...)) of the file: spellings, negations, whether it takes a value, examples."""
    out = []
    for m in re.finditer(r"add_opt\(\s*common_arg\(", arg_cpp):
        open_ = m.end() - 1
        close = _balanced(arg_cpp, open_)
        body = re.sub(r"^(\s*//[^\n]*\n|\s*/\*.*?\*/)*", "", arg_cpp[open_ + 1 : close - 1], flags=re.S).lstrip()
        if not body.startswith("{"):
            continue  # not a spelled option
        end_args = _balanced(body, 0)
        spellings = _strings(body[:end_args])
        rest = body[end_args:].lstrip().lstrip(",").lstrip()
        negations = []
        if rest.startswith("{"):
            end_neg = _balanced(rest, 0)
            negations = _strings(rest[:end_neg])
            rest = rest[end_neg:].lstrip().lstrip(",").lstrip()
        # (args, help, handler) takes no value; (args, hint, help, handler) and (args, hint, hint2, help,
        # handler) take one (or two); (args, negations, help, handler) is a flag
        takes_value = len(_top_level_args(rest)) >= 3 and not negations
        # the chained calls after common_arg(...) up to the add_opt's own closing parenthesis
        tail_end = _balanced(arg_cpp, m.start() + len("add_opt"))
        tail = arg_cpp[close : tail_end - 1]
        examples = {COMMON}
        if mm := re.search(r"\.set_examples\(\s*(\{.*?\}|[a-z_]+)\s*\)", tail, re.S):
            examples = set(re.findall(r"LLAMA_EXAMPLE_\w+", mm.group(1))) or {f"<{mm.group(1)}>"}
        excludes = set()
        if mm := re.search(r"\.set_excludes\(\s*\{(.*?)\}\s*\)", tail, re.S):
            excludes = set(re.findall(r"LLAMA_EXAMPLE_\w+", mm.group(1)))
        out.append(
            {
                "spellings": spellings,
                "negations": negations,
                "takes_value": takes_value,
                "choices": _choices(rest, arg_cpp) if takes_value else None,
                "examples": sorted(examples),
                "excludes": sorted(excludes),
            }
        )
    return out


def named_lists(arg_cpp: str) -> dict[str, list[str]]:
    """`static std::initializer_list<enum llama_example> NAME = {...}` lists that set_examples(NAME) refers to."""
    return {
        name: re.findall(r"LLAMA_EXAMPLE_\w+", body)
        for name, body in re.findall(
            r"static std::initializer_list<enum llama_example>\s+(\w+)\s*=\s*\{(.*?)\};", arg_cpp, re.S
        )
    }


def server_table(llama_cpp_dir: str | Path) -> dict:
    """llama-server's options: {spelling: {takes_value, choices (where the source spells them)}}, with the
    source's commit."""
    root = Path(llama_cpp_dir)
    src = (root / "common" / "arg.cpp").read_text()
    lists = named_lists(src)
    flags = {}
    for opt in options(src):
        examples = set()
        for e in opt["examples"]:
            examples |= set(lists.get(e[1:-1], [])) if e.startswith("<") else {e}
        if (SERVER in examples or COMMON in examples) and SERVER not in opt["excludes"]:
            entry = {"takes_value": opt["takes_value"]}
            if opt["choices"]:
                entry["choices"] = opt["choices"]
            for s in opt["spellings"]:
                flags[s] = entry
            for s in opt["negations"]:
                flags[s] = {"takes_value": False}
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "source": "common/arg.cpp of llama.cpp (vendored by llama-cpp-python 0.3.36 at vendor/llama.cpp)",
        "commit": commit,
        "how": "tests/lcp_args.py: options valid for LLAMA_EXAMPLE_SERVER (or COMMON, not excluded)",
        "flags": dict(sorted(flags.items())),
    }


if __name__ == "__main__":
    print(json.dumps(server_table(sys.argv[1] if len(sys.argv) > 1 else "/work/ref/lcp/vendor/llama.cpp"), indent=1))
