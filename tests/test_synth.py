"""Synthetic GGUF models: real files llama.cpp loads, deterministic by seed, described right by ggufmeta."""

from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.model.meta import read_model
from tuner.model.synth import PRESETS, synthesize


def sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_tiny_presets_and_quants(tmp_path):
    paths = synthesize(tmp_path, "tiny", ("f16", "q8_0", "q4_k_m"))
    assert [p.name for p in paths] == ["tiny-f16.gguf", "tiny-q8_0.gguf", "tiny-q4_k_m.gguf"]
    infos = [read_model(p) for p in paths]
    assert [i.file_type for i in infos] == ["F16", "Q8_0", "Q4_K_M"]
    shape = PRESETS["tiny"]
    for i in infos:
        assert (i.arch, i.n_layer, i.n_embd, i.n_head, i.n_head_kv, i.n_ff, i.n_vocab) == (
            "llama",
            shape.n_layer,
            shape.n_embd,
            shape.n_head,
            shape.n_head_kv,
            shape.n_ff,
            shape.n_vocab,
        )
        assert i.n_params == shape.n_params()
        assert i.name == "tuner-synth-tiny"
    # quantized files are smaller, in the order of their bits per weight
    sizes = [p.stat().st_size for p in paths]
    assert sizes[0] > sizes[1] > sizes[2]
    assert not list(tmp_path.glob("*.part")), "no partial files left"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = synthesize(tmp_path / "a", "tiny", ("q8_0",), seed=0)[0]
    b = synthesize(tmp_path / "b", "tiny", ("q8_0",), seed=0)[0]
    c = synthesize(tmp_path / "c", "tiny", ("q8_0",), seed=1)[0]
    assert sha(a) == sha(b) != sha(c)
    assert read_model(a).content_hash == read_model(b).content_hash != read_model(c).content_hash
    # only the asked-for quant is kept: the f16 base was a temporary
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tiny-q8_0.gguf"]


def test_existing_files_are_kept_unless_forced(tmp_path):
    p = synthesize(tmp_path, "tiny", ("f16",))[0]
    first = sha(p)
    synthesize(tmp_path, "tiny", ("f16",), seed=5)
    assert sha(p) == first
    synthesize(tmp_path, "tiny", ("f16",), seed=5, force=True)
    assert sha(p) != first


def test_custom_sizes(tmp_path):
    p = synthesize(tmp_path, "tiny", ("f16",), n_layer=3, n_vocab=300)[0]
    info = read_model(p)
    assert info.n_layer == 3 and info.n_vocab == 300
    assert sorted({t.layer for t in info.tensors if t.layer is not None}) == [0, 1, 2]


def test_moe_preset_has_routed_experts(models):
    info = read_model(models / "moe-q8_0.gguf")
    shape = PRESETS["moe"]
    assert (info.n_expert, info.n_expert_used) == (shape.n_expert, shape.n_expert_used)
    groups = info.bytes_by_group()
    assert groups["exps"] > groups["attn"] > 0
    per_layer = info.layer_bytes()
    assert len(per_layer) == shape.n_layer and all(layer["exps"] > 0 for layer in per_layer)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"quants": ("q9_9",)}, "unknown quant type"),
        ({"n_embd": 100}, "multiples of 256"),
        ({"n_head": 3}, "must divide"),
        ({"n_vocab": 100}, "n_vocab must be at least"),
    ],
)
def test_bad_shapes_are_value_errors(tmp_path, kw, msg):
    quants = kw.pop("quants", ("f16",))
    with pytest.raises(ValueError, match=msg):
        synthesize(tmp_path, "tiny", quants, **kw)
    assert list(tmp_path.iterdir()) == [], "nothing half-written"


def test_synth_command(tmp_path):
    res = CliRunner().invoke(cli, ["synth", str(tmp_path / "m"), "--quants", "f16,q4_0"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == [
        str(tmp_path / "m" / "tiny-f16.gguf"),
        str(tmp_path / "m" / "tiny-q4_0.gguf"),
    ]
    assert lines[0].endswith("MiB")
    assert read_model(tmp_path / "m" / "tiny-q4_0.gguf").file_type == "Q4_0"


def test_synth_command_bad_quant_is_one_line_error(tmp_path):
    res = CliRunner().invoke(cli, ["synth", str(tmp_path), "--quants", "q9_9"])
    assert res.exit_code == 2
    assert res.stderr == "tuner: error: unknown quant type(s): q9_9\n"
    assert not list(tmp_path.glob("*.gguf"))


def test_the_cli_offers_every_preset():
    """`tuner synth --preset` lists its choices by hand (the CLI loads fast); they must be the presets."""
    from tuner.cli.synth import synth

    preset = next(p for p in synth.params if p.name == "preset")
    assert sorted(preset.type.choices) == sorted(PRESETS)
