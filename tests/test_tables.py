"""tuner.tables: the one table writer, terminal text (rich) and GitHub markdown."""

from __future__ import annotations

from tuner.tables import markdown_table, text_table


def test_markdown_padded_as_llama_bench_prints_it():
    t = markdown_table(["model", "fa", "p", "t/s"], [["tiny Q8_0", "on", "-", "10.50 ± 0.20"]], right={2, 3})
    assert t.splitlines() == [
        "| model     | fa |   p |          t/s |",
        "| --------- | -- | --: | -----------: |",  # a right-aligned column: at least --:
        "| tiny Q8_0 | on |   - | 10.50 ± 0.20 |",
    ]


def test_markdown_unpadded_and_text():
    assert markdown_table(["a", "b"], [["x", "yy"]], pad=False) == "| a | b |\n|---|---|\n| x | yy |"
    assert text_table(["model", "KLD"], [["a.gguf", "0.1"], ["long-name.gguf", ""]], rule=False).splitlines() == [
        "model           KLD",
        "a.gguf          0.1",
        "long-name.gguf",
    ]
    ruled = text_table(["n", "t/s"], [["1", "10.5"]], right={1}).splitlines()
    assert ruled[0].split() == ["n", "t/s"] and set(ruled[1]) <= {"─", " "} and ruled[2].endswith("10.5")
