"""The pass (worker side): `tuner.measure.worker` hands `{"kind": "quality", ...}` jobs to run_job.

Tokenize and decode as llama-perplexity does, summarize the reference's logits or compare with them, in
chunks of ROWS output rows so the numpy buffers stay bounded.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import numpy as np

from tuner.quality.kld import compare_rows, statistics, summarize_rows
from tuner.quality.logits import ReferenceLogits, per_chunk
from tuner.record import TrialConfig

ROWS = 64  # output rows processed at once: bounds the numpy buffers (rows × n_vocab floats)


def tokenize(L, model_path: str, data: bytes) -> tuple[np.ndarray, bool, int]:
    """Tokens of `data` as llama-perplexity gets them (special tokens added, not parsed), with a vocabulary-only
    load: a text too short is found before the weights are read. Returns (tokens, add_bos, bos id)."""
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    model = L.llama_model_load_from_file(model_path.encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not read the vocabulary of {model_path}")
    try:
        vocab = L.llama_model_get_vocab(model)
        n_max = len(data) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
        if n < 0:
            raise RuntimeError(f"tokenizer needs {-n} tokens, more than {n_max}")
        return (
            np.frombuffer(buf, dtype=np.int32, count=n).copy(),
            bool(L.llama_vocab_get_add_bos(vocab)),
            int(L.llama_vocab_bos(vocab)),
        )
    finally:
        L.llama_model_free(model)


def run_job(worker, job: dict) -> dict:
    """One quality pass in the worker: `mode` "reference" (tokenize, decode, write the summary to job["out"])
    or "compare" (decode the reference file's tokens, compare with its summary)."""
    # the worker runs as `python -m tuner.measure.worker`: its classes live in __main__, and only its own
    # TrialFailure is caught and reported as a failed job (an import of tuner.measure.worker would be a second copy)
    w = sys.modules[type(worker).__module__]
    TrialFailure, DECODE_OOM, classify_log, inject_early = w.TrialFailure, w.DECODE_OOM, w.classify_log, w.inject_early
    L = worker.L
    worker.emit("stage", stage="start")
    ctx_n = int(job["ctx"])
    if job["mode"] == "reference":
        data = Path(job["text"]).read_bytes()
        if data.endswith(b"\n"):
            data = data[:-1]  # llama.cpp's -f drops one trailing newline
        tokens, add_bos, bos = tokenize(L, job["model"], data)
        n_chunk = len(tokens) // ctx_n
        if n_chunk < 1:
            raise TrialFailure(
                "bad_input", f"the text is {len(tokens)} tokens, shorter than one chunk of --ctx {ctx_n}"
            )
        tokens = tokens[: n_chunk * ctx_n]
        ref = None
        top_k, tail_samples = int(job["top_k"]), int(job["tail_samples"])
        rng = np.random.default_rng(0)  # the tail samples: the same reference gives the same summary
    else:
        ref = ReferenceLogits.load(job["reference"])
        tokens, n_chunk = ref.tokens, ref.n_chunk
    cfg = TrialConfig(model=job["model"], n_gpu_layers=int(job.get("n_gpu_layers", 99)), rpc=job.get("rpc", ""))
    worker.load(cfg, None)
    model = worker.model
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    add_bos = bool(L.llama_vocab_get_add_bos(vocab))
    bos = L.llama_vocab_bos(vocab)

    n_batch = min(ctx_n, 2048)  # llama-perplexity: n_batch = min(2048, n_ctx), n_ubatch 512
    cp = L.llama_context_default_params()
    cp.n_ctx = ctx_n
    cp.n_batch = n_batch
    cp.n_ubatch = min(512, n_batch)
    cp.n_seq_max = 1
    n_threads = int(job.get("n_threads") or 0) or w.physical_cores()
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.type_k = w.ggml_type(job.get("type_k", "f16"))
    cp.type_v = w.ggml_type(job.get("type_v", "f16"))
    cp.swa_full = False  # as llama.cpp's common params
    cp.no_perf = True
    worker.emit("stage", stage="context")
    mark = len(worker.log.lines)
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise TrialFailure(
            *classify_log("".join(worker.log.lines[mark:]), "error", "llama.cpp failed to create the context")
        )
    first = ctx_n // 2
    per = per_chunk(ctx_n)
    batch = L.llama_batch_init(n_batch, 0, 1)
    try:
        b_tok = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        b_pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        b_nseq = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))
        b_out = np.ctypeslib.as_array(ctypes.cast(batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n_batch,))
        for i in range(n_batch):
            batch.seq_id[i][0] = 0
        b_nseq[:] = 1
        buf = np.empty((ROWS, n_vocab), dtype=np.float32)
        mem = L.llama_get_memory(ctx)
        parts: dict[str, list] = {}
        decode_s = numpy_s = 0.0
        worker.emit("stage", stage="chunk", done=0, total=n_chunk)
        for c in range(n_chunk):
            chunk = tokens[c * ctx_n : (c + 1) * ctx_n].copy()
            if add_bos:
                chunk[0] = bos
            targets = chunk[first + 1 :]  # position p predicts token p + 1
            ref_c = ref.chunk(c) if ref is not None else None
            L.llama_memory_clear(mem, True)
            row = 0  # scored positions handled so far in this chunk
            for start in range(0, ctx_n, n_batch):
                n = min(n_batch, ctx_n - start)
                pos = np.arange(start, start + n)
                b_tok[:n] = chunk[start : start + n]
                b_pos[:n] = pos
                want = (pos >= first) & (pos <= ctx_n - 2)  # only the scored positions' logits
                b_out[:n] = want
                batch.n_tokens = n
                t0 = time.perf_counter()
                rc = L.llama_decode(ctx, batch)
                if rc != 0:
                    raise TrialFailure(
                        "oom" if rc in DECODE_OOM else "error",
                        f"llama_decode returned {rc}" + (f": {DECODE_OOM[rc]}" if rc in DECODE_OOM else ""),
                    )
                n_out = int(want.sum())
                L.llama_synchronize(ctx)
                t1 = time.perf_counter()
                decode_s += t1 - t0
                if not n_out:
                    continue
                ptr = L.llama_get_logits(ctx)
                logits = np.ctypeslib.as_array(ptr, shape=(n_out * n_vocab,)).reshape(n_out, n_vocab)
                for r0 in range(0, n_out, ROWS):
                    x = logits[r0 : r0 + ROWS]
                    k = slice(row + r0, row + r0 + len(x))
                    b = buf[: len(x)]
                    if ref is None:
                        summ = summarize_rows(x, targets[k], top_k, b, tail_samples, rng)
                        for name, arr in summ.items():
                            parts.setdefault(name, []).append(arr)
                        ref_rows = summ
                    else:
                        ref_rows = {name: arr[k] for name, arr in ref_c.items()}
                    cmp = compare_rows(x, targets[k], ref_rows, b)
                    cmp["nll_ref"] = ref_rows["nll"]
                    for name, arr in cmp.items():
                        parts.setdefault("cmp_" + name, []).append(arr)
                row += n_out
                numpy_s += time.perf_counter() - t1
            assert row == per
            worker.emit("stage", stage="chunk", done=c + 1, total=n_chunk)
            if c == 0 and job.get("fault"):
                inject_early(job["fault"])  # a real fault in the middle of a pass (tests)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    stats = statistics(cat["cmp_kld"], cat["cmp_nll"], cat["cmp_nll_ref"], cat["cmp_same_top"])
    out = {"stats": stats, "n_chunk": n_chunk, "n_vocab": n_vocab, "decode_s": decode_s, "numpy_s": numpy_s}
    if ref is None:
        header = dict(job["header"], n_chunk=n_chunk, add_bos=add_bos, bos=int(bos))
        if n_vocab != header["n_vocab"]:
            raise TrialFailure("error", f"llama.cpp reports {n_vocab} tokens, the GGUF header {header['n_vocab']}")
        ReferenceLogits(header, tokens.astype(np.int32), *(cat[k] for k in ReferenceLogits.ARRAYS[1:])).save(job["out"])
    return out
