"""Fuzz the GGUF metadata path with mutated real headers: read_model reads the file or raises ModelError.

The fuzz loop runs in a child interpreter with an address-space cap (RLIMIT_AS) and a per-case alarm, so a
crash, a hang or an unbounded allocation in ggufmeta or the gguf reader fails the test instead of taking
the test run (or the machine) down with it. Run this file directly to fuzz longer:

    .venv/bin/python tests/test_fuzz_gguf.py MODEL.gguf 5000
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEADER = 16 << 10  # the tiny model's KV + tensor-info header is ~13 KiB; mutate within it
AS_CAP = 2 << 30  # bytes of address space for the fuzzing child (numpy + gguf need a few hundred MiB)
CASE_TIMEOUT = 10  # seconds per case; reading the tiny header takes milliseconds


def test_fuzz_read_model(models, tmp_path):
    # 1000 cases take ~6 s on 2 cores; the child prints a summary line that proves it really ran them.
    proc = subprocess.run(
        [sys.executable, __file__, str(models / "tiny-q8_0.gguf"), "1000", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("fuzzed ")]
    assert summary, out[-3000:]
    n, ok, err = (int(x) for x in summary[-1].split()[1::2])
    assert n >= 1000 and ok + err == n
    # Both paths must really be exercised: some mutations are harmless, most break the file.
    assert ok > 0 and err > 0, summary


def test_known_hostile_headers(models, tmp_path):
    """Hand-made worst cases run in the same capped child: huge counts and lengths in every header field."""
    proc = subprocess.run(
        [sys.executable, __file__, str(models / "tiny-q8_0.gguf"), "hostile", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("hostile ")][-1]
    assert int(line.split()[1]) >= 20, line


# --- the child side ------------------------------------------------------------------------------------------


def _interesting_offsets(path: Path) -> list[int]:
    """Where counts and lengths live: n_tensors, n_kv, every key length, string length and array count."""
    import gguf

    r = gguf.GGUFReader(path)
    offs = [8, 16]
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        key_len = len(name.encode())
        offs.append(f.offset)  # key length
        type_at = f.offset + 8 + key_len
        offs.append(type_at)
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            offs += [type_at + 4, type_at + 8]  # element type, element count
        elif f.types and f.types[0] == gguf.GGUFValueType.STRING:
            offs.append(type_at + 4)  # string length
    for t in r.tensors:
        offs.append(t.field.offset)  # tensor name length
        offs.append(t.field.offset + 8 + len(t.name.encode()))  # n_dims
    return [o for o in offs if o < HEADER]


class Hang(BaseException):
    """Not an Exception: the code under test catches Exception broadly and must not swallow this."""


def _check(data: bytes, work: Path, counter: list[int]) -> str:
    """Read one mutated file; return 'ok' or 'err'. Anything else raises (and hypothesis reports it)."""
    import signal

    from tuner.model.meta import ModelError, read_model

    counter[0] += 1
    p = work / f"case-{counter[0]}.gguf"  # a fresh path per case: read_model caches by path, mtime and size
    p.write_bytes(data)

    def hang(*_):
        raise Hang(f"read_model hung on case {counter[0]} (> {CASE_TIMEOUT} s)")

    signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_TIMEOUT)
    try:
        info = read_model(p)
        # what every consumer calls next must be bounded too (n_layer sizes a list)
        info.layer_bytes()
        info.bytes_by_group()
        info.facts()
        return "ok"
    except ModelError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"ModelError must be one line: {msg!r}"
        return "err"
    finally:
        signal.alarm(0)
        p.unlink()


def _hostile_cases(base: bytes, offsets: list[int]) -> list[bytes]:
    import struct

    cases = []
    for off in offsets:
        for v in (2**64 - 1, 2**63, 2**40, 2**32 - 1, 2**31, 0):
            d = bytearray(base)
            d[off : off + 8] = struct.pack("<Q", v)
            cases.append(bytes(d))
        d = bytearray(base)
        d[off : off + 4] = struct.pack("<I", 0xFFFFFFFF)
        cases.append(bytes(d))
    for n in (0, 3, 4, 7, 8, 23, 24, 100, 4096, HEADER):
        cases.append(base[:n])
    return cases


def _main(argv: list[str]) -> int:
    import resource

    model, mode, work = Path(argv[0]), argv[1], Path(argv[2])
    base = model.read_bytes()
    offsets = _interesting_offsets(model)
    # Cap the address space only after the imports above, so the cap measures the reader, not numpy.
    import gguf  # noqa: F401

    import tuner.model.meta  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))
    counter = [0]
    if mode == "hostile":
        for data in _hostile_cases(base, offsets):
            _check(data, work, counter)
        print(f"hostile {counter[0]}")
        return 0

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    n_examples = int(mode)
    counts = {"ok": 0, "err": 0}
    pos = st.integers(0, HEADER - 1)
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("truncate"), st.integers(0, HEADER), st.just(0)),
        st.tuples(
            st.just("u64"),
            st.sampled_from(offsets),
            st.sampled_from([0, 1, 255, 2**16, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]),
        ),
    )

    @settings(
        max_examples=n_examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(st.lists(op, min_size=1, max_size=4))
    def fuzz(ops):
        d = bytearray(base)
        for kind, at, arg in ops:
            at = min(at, len(d))
            if kind == "flip" and at < len(d):
                d[at] ^= arg
            elif kind == "set" and at < len(d):
                d[at] = arg
            elif kind == "insert":
                d[at:at] = arg
            elif kind == "delete":
                del d[at : at + arg]
            elif kind == "truncate":
                del d[at:]
            elif kind == "u64":
                d[at : at + 8] = arg.to_bytes(8, "little")
        counts[_check(bytes(d), work, counter)] += 1

    fuzz()
    print(f"fuzzed {counter[0]} ok {counts['ok']} err {counts['err']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(_main(sys.argv[1:]))
