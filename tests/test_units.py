"""tuner.units: the one size parser, the formatters, and its place on the ground floor."""

from __future__ import annotations

import pytest
from test_house import import_graph

from tuner import units


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 << 30),
        ("24G", 24 << 30),
        ("512M", 512 << 20),
        ("1.5GB", 1_500_000_000),
        ("1000000", 1_000_000),
        ("4 KiB", 4096),
        (7, 7),
        (None, None),
    ],
)
def test_sizes_parse_binary_unless_the_unit_says_decimal(text, expected):
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "12X", "-1G", "1.2.3G"])
def test_a_bad_size_is_one_line_naming_it(text):
    with pytest.raises(ValueError, match=r"^not a size: .* \(use e\.g\. 24GiB, 512M\)$"):
        units.parse_size(text)


def test_sizes_durations_and_clocks_format():
    assert [units.fmt_size(x) for x in (None, 512, 1536, 3 << 30)] == ["-", "512 B", "1.50 KiB", "3.00 GiB"]
    assert units.parse_duration("1h30m") == 5400 and units.parse_duration("90") == 90
    with pytest.raises(ValueError, match="not a duration"):
        units.parse_duration("soon")
    assert units.hms(3725) == "1:02:05" and units.fmt_duration(185) == "3m05s"


def test_the_cli_option_and_units_share_one_parser():
    from tuner.cli.options import SIZE
    from tuner.units import parse_size

    assert parse_size is units.parse_size
    assert SIZE.convert("2G", None, None) == 2 << 30


def test_units_imports_no_tuner_module():
    assert import_graph(function_level=True)["tuner.units"] == set()
