"""The ``medseg`` command as a user meets it: start-up without torch for --help and inspect, one log
format on stderr, and --help that shows every option's default."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CT_BUNDLE = ROOT / "bundles" / "ct_abdomen_phantom"
LINE = re.compile(r"^\d\d:\d\d:\d\d [DIWEC] [\w.]+: \S")
#: Runs the CLI in a fresh interpreter, then prints which heavy packages it imported.
_PROBE = """
import sys
from medseg.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("IMPORTED", sorted(m for m in ("torch", "monai", "ignite", "scipy", "matplotlib") if m in sys.modules))
sys.exit(code)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _imported(*args: str) -> tuple[int, list[str], str]:
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300,
                            env=_env())
    line = next(line for line in result.stdout.splitlines() if line.startswith("IMPORTED"))
    return result.returncode, eval(line.split(" ", 1)[1]), result.stdout  # noqa: S307 - our own list literal


def test_help_and_inspect_of_a_dicom_folder_do_not_import_torch_or_monai(tmp_path: Path) -> None:
    from medseg.data.synthetic.dicom import phantom_series

    phantom_series(tmp_path / "dicom", "ct", seed=1, size=32)
    code, heavy, _ = _imported("--help")
    assert code == 0 and heavy == [], heavy
    code, heavy, out = _imported("inspect", str(tmp_path / "dicom"))
    assert code == 0 and "CT" in out, out
    assert "torch" not in heavy and "monai" not in heavy, heavy


def test_predict_stderr_is_one_format_even_with_debug(tmp_path: Path) -> None:
    """No Ignite or MONAI format, no FutureWarnings, no pylibjpeg plugin lists: every line is medseg's."""
    from medseg.data.synthetic import Grid, make_phantom

    image, _ = make_phantom(np.random.default_rng(3), Grid.centred((64, 64, 32), (1.3, 1.3, 2.5), (0, 0, 0)), "ct")
    sitk.WriteImage(image, str(tmp_path / "case.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "medseg", "--debug", "predict", "--model", str(CT_BUNDLE),
                             "--input", str(tmp_path / "case.nii.gz"), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("[1/1] case.nii.gz" in line for line in lines), lines
    assert all(LINE.match(line) for line in lines), [line for line in lines if not LINE.match(line)]
    assert not [line for line in lines if "pylibjpeg" in line or "Warning:" in line or "matplotlib" in line], lines
    assert result.stdout.splitlines() == [str(tmp_path / "out" / "case_seg.nii.gz")]


def _parsers(parser: argparse.ArgumentParser, name: str = "medseg") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_help_of_every_subcommand_shows_every_options_default() -> None:
    checked = 0
    for name, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())  # unwrapped
        alternatives = {a for group in parser._mutually_exclusive_groups for a in group._group_actions}
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help, f"{name} {action.option_strings[0]}: no help text"
            default = action.default
            if default is None and not action.required and action not in alternatives:
                # what leaving it out means is said in words, e.g. "(default: no time limit)"
                assert "(default: " in action.help, f"{name} {action.option_strings[0]}: what is its default?"
            if default is None or default is False or default == []:
                continue
            help_text = " ".join((action.help or "").split())
            shown = f"(default: {default})" in text or ("default:" in help_text and help_text in text)
            assert shown, f"{name} {action.option_strings[0]}: default {default!r} not in --help"
            checked += 1
    assert checked >= 25  # every subcommand was looked at
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["predict"].format_help().split())
    assert "(default: 0.5)" in text and "(default: float32)" in text and "--strict" in text


@pytest.mark.parametrize("command", [["predict"], ["evaluate"], ["bundle", "run"], ["pacs", "listen"]])
def test_help_exits_0_and_prints_defaults(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.cli import main

    with pytest.raises(SystemExit) as excinfo:
        main([*command, "--help"])
    assert excinfo.value.code == 0 and "(default: " in capsys.readouterr().out
