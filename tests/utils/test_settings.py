"""fastsel.utils.settings: flags made from dataclass fields, read back, needs-checks and the JSON round trip."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from fastsel.utils.settings import (
    JsonSettings,
    add_setting_arguments,
    check_needs,
    comma_ints,
    comma_list,
    differs_from_default,
    needs_of,
    setting,
    values_from_args,
)


@dataclass
class Inner(JsonSettings):
    rate: float = setting(0.5, "a rate")


@dataclass
class Example(JsonSettings):
    name: str = setting("a", "a name", choices=("a", "b"))
    count: int | None = setting(None, "a count")
    ratio: float = setting(0.25, "a ratio", metavar="R")
    switch: bool = setting(False, "turns on")
    progress: bool = setting(True, "turns progress off", flag="--no-progress")
    bucket: bool = setting(True, "on by default, --no-bucket turns it off")
    fields_: tuple[str, ...] = setting((), "columns", flag="--fields", type=comma_list)
    every: int = setting(10, "how often", needs="--switch", flag="--every-examples")
    hidden: int = setting(3, "set by code", cli=False)
    inner: Inner = setting(default_factory=Inner, help="nested", cli=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_setting_arguments(p, Example)
    return p


def test_every_cli_field_becomes_one_flag_and_no_other():
    flags = {a.option_strings[0]: a for a in _parser()._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {"--name", "--count", "--ratio", "--switch", "--no-progress", "--bucket", "--fields",
                          "--every-examples"}
    assert flags["--name"].choices == ("a", "b") and flags["--ratio"].metavar == "R"
    assert flags["--count"].type is int  # from the annotation, the default being None
    assert flags["--every-examples"].dest == "every" and flags["--every-examples"].default is argparse.SUPPRESS


def test_parsed_values_build_the_dataclass():
    args = _parser().parse_args(["--name", "b", "--count", "7", "--switch", "--no-progress", "--no-bucket",
                                 "--fields", "x, y", "--every-examples", "4"])
    got = Example(**values_from_args(Example, args))
    assert got == Example(name="b", count=7, switch=True, progress=False, bucket=False, fields_=("x", "y"), every=4)
    defaults = Example(**values_from_args(Example, _parser().parse_args([])))
    assert defaults == Example()  # a needs-flag not given keeps the field default
    assert "every" not in values_from_args(Example, _parser().parse_args([]))


def test_bad_values_are_usage_errors(capsys):
    for argv in (["--name", "c"], ["--count", "x"], ["--ratio", "nan-ish"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
    assert "--name" in capsys.readouterr().err


def test_help_shows_the_defaults_and_what_a_flag_needs():
    text = " ".join(_parser().format_help().split())
    assert "--every-examples EVERY --switch: how often (default: 10)" in text
    assert "--ratio R a ratio (default: 0.25)" in text
    assert "turns progress off (default: True)" not in text  # a switch that turns off shows no confusing True


def test_needs_are_checked():
    assert needs_of(Example) == [("--every-examples", "every", "--switch")]
    check_needs(_parser().parse_args(["--switch", "--every-examples", "3"]), Example)
    check_needs(_parser().parse_args([]), Example)
    with pytest.raises(ValueError, match="--every-examples only applies with --switch"):
        check_needs(_parser().parse_args(["--every-examples", "3"]), Example)


def test_json_round_trip_restores_tuples_and_nested_settings():
    e = Example(fields_=("a", "b"), count=2, inner=Inner(rate=0.75))
    text = e.to_json()
    assert json.loads(text)["fields_"] == ["a", "b"] and e.to_dict() == json.loads(text)
    back = Example.from_json(text)
    assert back == e and isinstance(back.fields_, tuple) and isinstance(back.inner, Inner)
    with pytest.raises(ValueError, match=r"unknown Example keys \['nope'\]"):
        Example.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="must be a JSON object"):
        Example.from_json("[1, 2]")


def test_to_json_refuses_nan():
    with pytest.raises(ValueError):
        Example(ratio=float("nan")).to_json()


def test_differs_from_default():
    e = Example(count=None, ratio=0.5)
    assert not differs_from_default(e, "count") and differs_from_default(e, "ratio")
    assert not differs_from_default(Example(), "inner")  # default_factory fields compare to a fresh default


def test_comma_lists():
    assert comma_list("a, b,,c ") == ("a", "b", "c") and comma_list(["x", " y"]) == ("x", "y") and comma_list("") == ()
    assert comma_ints("1, 3") == (1, 3) and comma_ints([2]) == (2,) and comma_ints("") == ()
    with pytest.raises(ValueError):
        comma_ints("1,x")
