"""N sequences decoded together, measured the way llama-batched-bench does (worker side: `tuner bench --parallel N`).

llama-batched-bench (tools/batched-bench/batched-bench.cpp, its default: prompts not shared, generation not
separate) puts every sequence's prompt in one batch with its own seq_id, decodes it in n_batch chunks and
synchronizes once (t_pp), then decodes n_gen steps of one token per sequence each, synchronizing after every
step (t_tg): S_PP = N x n_prompt / t_pp, S_TG = N x n_gen / t_tg. One context holds the N sequences: n_seq_max
= N and either n_ctx / N cells per sequence or one unified cache (llama-server's -np N and -kvu), so the KV
layout is the one a server with N slots has.

Beside batched-bench's figures this records what a client of such a server sees: each sequence's t/s (the
aggregate / N: every sequence waits for the whole batch) and its TTFT, the time until the decode that holds its
last prompt token returns (its first token can be sampled then). To see that moment the prompt pass also
synchronizes after each chunk that ends a prompt (at most N waits; none in between, as batched-bench).
"""

from __future__ import annotations

import ctypes
import time

import numpy as np

from tuner.record import TrialConfig


class Batch:
    """A llama_batch over numpy arrays, with views of a part of it (batched-bench's get_sub_batch)."""

    def __init__(self, L, n: int):
        self.L = L
        self.n = 0
        self.token = np.zeros(max(n, 1), np.int32)
        self.pos = np.zeros(max(n, 1), np.int32)
        self.n_seq_id = np.ones(max(n, 1), np.int32)
        self.seq = np.zeros(max(n, 1), np.int32)
        self.logits = np.zeros(max(n, 1), np.int8)
        # seq_id is an array of pointers, one per token, each to its (single) sequence id
        self.seq_ptr = (ctypes.POINTER(L.llama_seq_id) * len(self.seq))()
        base = self.seq.ctypes.data
        for i in range(len(self.seq)):
            self.seq_ptr[i] = ctypes.cast(base + 4 * i, ctypes.POINTER(L.llama_seq_id))

    def fill(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, logits: np.ndarray) -> None:
        n = len(tokens)
        self.token[:n], self.pos[:n], self.seq[:n], self.logits[:n] = tokens, pos, seq, logits
        self.n = n

    def view(self, start: int, n: int):
        L = self.L

        def at(arr, ctype):
            return ctypes.cast(arr.ctypes.data + arr.itemsize * start, ctypes.POINTER(ctype))

        seq_ids = ctypes.cast(
            ctypes.addressof(self.seq_ptr) + ctypes.sizeof(ctypes.c_void_p) * start,
            ctypes.POINTER(ctypes.POINTER(L.llama_seq_id)),
        )
        return L.llama_batch(
            n_tokens=n,
            token=at(self.token, L.llama_token),
            embd=None,
            pos=at(self.pos, L.llama_pos),
            n_seq_id=at(self.n_seq_id, ctypes.c_int32),
            seq_id=seq_ids,
            logits=at(self.logits, ctypes.c_int8),
        )


def layout(cfg: TrialConfig, n_prompt: int, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions, sequence ids and output flags of N prompts of n_prompt tokens each from position `start`, one
    sequence after the other (batched-bench's order), the last token of each an output."""
    n = cfg.streams()
    pos = np.tile(np.arange(start, start + n_prompt, dtype=np.int32), n)
    seq = np.repeat(np.arange(n, dtype=np.int32), n_prompt)
    logits = np.zeros(n * n_prompt, np.int8)
    logits[n_prompt - 1 :: n_prompt] = 1
    return pos, seq, logits


def measure(worker, ctx, cfg: TrialConfig, decode_failure, emit) -> dict:
    """Repetitions of one batched-bench test (N prompts, then n_gen steps of N tokens) in `ctx`; returns the
    record's sample lists. `decode_failure(rc)` raises the trial's failure for a llama_decode error code."""
    L = worker.L
    n = cfg.streams()
    vocab = L.llama_model_get_vocab(worker.model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    bos = L.llama_vocab_bos(vocab) if L.llama_vocab_get_add_bos(vocab) else None
    mem = L.llama_get_memory(ctx)
    n_batch = L.llama_n_batch(ctx)
    rng = np.random.default_rng(1234)
    batch = Batch(L, max(n * max(cfg.n_prompt, cfg.n_depth), n, 1))

    def tokens(count: int, per_seq: int) -> np.ndarray:
        t = rng.integers(0, n_vocab, size=count, dtype=np.int32)
        if bos is not None and per_seq:
            t[::per_seq] = bos  # each sequence starts as a request does
        return t

    def decode(start: int, count: int) -> None:
        rc = L.llama_decode(ctx, batch.view(start, count))
        if rc != 0:
            decode_failure(rc)

    def prompts(n_tok: int, start: int, ends: dict | None = None) -> None:
        """N prompts of n_tok tokens from position `start` in n_batch chunks; with `ends`, the time each
        sequence's last token came out (a synchronize after each chunk that ends a prompt)."""
        pos, seq, logits = layout(cfg, n_tok, start)
        batch.fill(tokens(n * n_tok, n_tok if start == 0 else 0), pos, seq, logits)
        for i in range(0, batch.n, n_batch):
            m = min(n_batch, batch.n - i)
            decode(i, m)
            if ends is not None:
                done = [int(s) for s, o in zip(seq[i : i + m], logits[i : i + m]) if o]
                if done:
                    L.llama_synchronize(ctx)
                    t = time.perf_counter_ns()
                    ends.update({s: t for s in done})
        L.llama_synchronize(ctx)

    def step(p: int) -> None:
        # one token for each sequence at position p, all outputs, synchronized (batched-bench's tg loop)
        batch.fill(tokens(n, 0), np.full(n, p, np.int32), np.arange(n, dtype=np.int32), np.ones(n, np.int8))
        decode(0, n)
        L.llama_synchronize(ctx)

    def repetition(timed: bool) -> tuple[float | None, float | None, list[float]]:
        L.llama_memory_clear(mem, False)
        if cfg.n_depth:  # each sequence filled to the depth first, untimed (llama-bench -d)
            prompts(cfg.n_depth, 0)
        ends: dict[int, int] = {}
        t0 = time.perf_counter_ns()
        if cfg.n_prompt:
            prompts(cfg.n_prompt, cfg.n_depth, ends if timed else None)
        t1 = time.perf_counter_ns()
        for i in range(cfg.n_gen):
            step(cfg.n_depth + cfg.n_prompt + i)
        t2 = time.perf_counter_ns()
        t_pp = (t1 - t0) / 1e9 if cfg.n_prompt else None
        t_tg = (t2 - t1) / 1e9 if cfg.n_gen else None
        return t_pp, t_tg, [(ends[j] - t0) / 1e6 for j in sorted(ends)]

    emit("stage", stage="warmup")
    if cfg.warmup:
        repetition(False)
    emit("stage", stage="pp")
    out: dict = {k: [] for k in ("pp_samples", "tg_samples", "ttft_samples_ms", "pp_stream_samples")}
    out["tg_stream_samples"] = []
    ttft_by_seq: list[list[float]] = []
    for _ in range(cfg.repetitions):
        t_pp, t_tg, ttft = repetition(True)
        if t_pp:
            out["pp_samples"].append(n * cfg.n_prompt / t_pp)
            out["pp_stream_samples"].append(cfg.n_prompt / t_pp)
        if t_tg:
            out["tg_samples"].append(n * cfg.n_gen / t_tg)
            out["tg_stream_samples"].append(cfg.n_gen / t_tg)
        if ttft:
            out["ttft_samples_ms"].append(float(np.mean(ttft)))
            ttft_by_seq.append(ttft)
    out["ttft_stream_ms"] = [float(x) for x in np.mean(ttft_by_seq, axis=0)] if ttft_by_seq else []
    return out
