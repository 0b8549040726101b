"""The command line: version, help, summary, models, datasets, recipes, python -m."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from vggkit import __version__
from vggkit.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"vggkit {__version__}"


def test_help_lists_every_command_with_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0]
    for name in sub.choices:  # a long name (import-keras) puts its help on the next line
        assert re.search(rf"^    {re.escape(name)}\s+\S", out, re.M), name


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "vggkit", "summary", "vgg16", "--head", "classic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().splitlines()[-3:] == [
        "Total params: 33,638,218", "Trainable params: 33,638,218", "Non-trainable params: 0"]


@pytest.mark.parametrize("args, code", [
    (["summary", "vgg16", "--json"], 141), (["recipes"], 141),
    (["--help"], 0),  # argparse itself ignores the failed write of its help
])
def test_a_closed_output_pipe_ends_quietly(args, code):
    """`vggkit summary vgg16 --json | head`: the reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "vggkit", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"
    assert proc.returncode == code  # 141 = 128 + SIGPIPE, as a Unix tool ended by the pipe


def test_summary_json_and_input_shape(capsys):
    assert main(["summary", "vgg16_bn", "--input", "1x64x64", "--classes", "100", "--head", "gap",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_shape"] == [None, 1, 64, 64]
    assert info["layers"][-1]["output_shape"] == [None, 100]
    assert info["trainable_params"] == 14_774_436 - 2 * 64 * 9  # first conv takes 1 channel


def test_summary_of_the_imagenet_head_at_a_size_the_pools_do_not_divide(capsys):
    assert main(["summary", "vgg16", "--input", "3x100x100", "--classes", "1000", "--head",
                 "imagenet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"][-1]["output_shape"] == [None, 1000]
    assert info["trainable_params"] == 138_357_544


@pytest.mark.parametrize("shape", ["3x30x30", "3x32", "axb"])
def test_summary_bad_input_is_a_usage_error(capsys, shape):
    assert main(["summary", "vgg16", "--input", shape]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_models_lists_counts_for_an_input(capsys):
    assert main(["models", "--input", "3x32x32", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["vgg_compact"]["trainable"] == 2_491_838
    assert {"vgg11", "vgg13_bn", "vgg16", "vgg19_bn"} <= set(rows)


def test_datasets_says_what_is_present(capsys, tmp_path):
    assert main(["datasets", "--data-dir", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["digits"]["present"] is True
    assert rows["mnist"]["present"] is False and str(tmp_path) in rows["mnist"]["location"]


def test_recipes_listed_with_descriptions(capsys):
    assert main(["recipes", "--json"]) == 0
    recipes = json.loads(capsys.readouterr().out)
    assert "vgg16-cifar10-classic" in recipes
    assert all(r["description"] for r in recipes.values())
    assert recipes["vgg16-cifar10-classic"]["config"]["schedule"] == "time-decay"


def test_unknown_recipe_suggests(capsys):
    assert main(["train", "--recipe", "vgg16-cifar10-clasic"]) == 2
    assert "did you mean 'vgg16-cifar10-classic'" in capsys.readouterr().err


def test_verbose_and_quiet_on_every_command():
    sub = build_parser()._subparsers._group_actions[0]
    for name, parser in sub.choices.items():
        flags = {o for a in parser._actions for o in a.option_strings}
        assert {"--verbose", "--quiet", "--debug"} <= flags, name


def test_logs_follow_stderr_after_the_command_returns():
    """The CLI's log handler writes to the stderr of the moment: after an in-process
    ``main()`` whose stderr was since closed (pytest's capture did), a later log reached
    a closed file and printed "--- Logging error ---" with a traceback instead."""
    import contextlib
    import io
    import logging

    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        assert main(["models"]) == 0
    first.close()
    later = io.StringIO()
    with contextlib.redirect_stderr(later):
        logging.getLogger("vggkit.train").warning("epoch 1/1 done")
    assert later.getvalue() == "epoch 1/1 done\n"
