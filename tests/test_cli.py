"""Tests of the ``art-queen`` command: argument errors (exit code 2), ``list``, and a tiny ``bench`` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from art_queen.cli import _defence_settings, build_parser, main


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--budgets", "0"], "budgets"),
        (["--budgets", "ten"], "--budgets takes int"),
        (["--seeds", "-1"], "seeds"),
        (["--defences", "Nope"], "valid defences are"),
        (["--attacks", "Copy"], "Unknown attack"),
        (["--dataset", "imagenet"], "Unknown dataset"),
        (["--dataset", "mnist"], "data_dir"),
        (["--queen-r", "-1"], "`r`"),
        (["--queen-k", "50"], "`k`"),
        (["--queen-scope", "everyone"], "scope"),
        (["--set", "Rounded.decimals=0"], "Rounded"),
        (["--set", "Rounded.colour=red"], "Rounded"),
        (["--set", "Rounded"], "DEFENCE.PARAM"),
        (["--jobs", "0"], "jobs"),
    ],
)
def test_bad_option_values_exit_with_code_2_and_a_message(arguments, message, tmp_path, capsys):
    code = main(["bench", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *arguments])
    assert code == 2
    error = capsys.readouterr().err
    assert "error" in error and message in error
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("arguments", [["bench", "--jobs", "two"], ["bench", "--verbose", "--quiet"], ["nope"]])
def test_argparse_errors_exit_with_code_2(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


def test_list_names_defences_and_attacks(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ("Queen", "ReverseSigmoid", "TopLabel", "CopycatCNN/soft", "KnockoffNets/adaptive/hard"):
        assert name in text


def test_queen_options_sweep_every_combination():
    args = build_parser().parse_args(["bench", "--queen-r", "0.1,0.2", "--queen-threshold", "0.05", "0.5"])
    settings = _defence_settings(args)
    assert len(settings["Queen"]) == 2 * 2 * 2  # r × threshold × both scopes
    assert {"r": 0.2, "threshold": 0.5, "scope": "per_client"} in settings["Queen"]
    args = build_parser().parse_args(
        ["bench", "--queen-beta", "2", "--queen-scope", "global", "--set", "Rounded.decimals=1,2"]
    )
    settings = _defence_settings(args)
    assert settings == {"Queen": ({"beta": 2.0, "scope": "global"},), "Rounded": ({"decimals": 1}, {"decimals": 2})}


@pytest.mark.torch
def test_tiny_bench_writes_outputs_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(
        [
            "bench",
            "--defences",
            "Rounded",
            "--attacks",
            "CopycatCNN/hard",
            "--budgets",
            "30",
            "--seeds",
            "0",
            "--victim-epochs",
            "2",
            "--clone-epochs",
            "1",
            "--clone-min-steps",
            "1",
            "--jobs",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Rounded" in printed and "NoDefence" in printed and "Wrote" in printed
    for name in ("results.json", "results.csv", "cells.csv", "summary.csv", "tradeoff.png"):
        assert os.path.getsize(out / name) > 0
    with open(out / "results.json", encoding="utf-8") as handle:
        data = json.load(handle)
    assert [c["defence"] for c in data["cells"]] == ["NoDefence", "Rounded"]
    assert data["config"]["budgets"] == [30]


def test_python_dash_m_runs_the_same_command(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "art_queen", "bench", "--budgets", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path, "HOME": str(tmp_path)},  # importing ART writes ~/.art
    )
    assert result.returncode == 2
    assert "budgets" in result.stderr
