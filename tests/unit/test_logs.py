"""One log format for the CLI (medseg.logs): Ignite's and MONAI's loggers routed through it, library
chatter and library warnings kept out, medseg's own warnings kept in; the bundles' logging.conf."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest

from medseg.logs import BUNDLE_LOGGING_CONF, setup_logging

#: ``20:04:45 I medseg.inference.predictor: message``
LINE = re.compile(r"^\d\d:\d\d:\d\d [DIWEC] [\w.]+: \S")
BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def test_ignite_and_monai_loggers_print_through_the_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    from ignite.utils import setup_logger
    from monai.apps.utils import get_logger

    setup_logging()
    ignite_logger = setup_logger("medseg_test_ignite.TimeLimit")  # Ignite: own handler, propagate off
    monai_logger = get_logger("medseg_test_monai.bundle")  # MONAI: own stdout handler, propagate off
    for logger in (ignite_logger, monai_logger):
        assert not [h for h in logger.handlers if type(h) is logging.StreamHandler] and logger.propagate
        logger.warning("disk almost full")
        logger.info("engine run starting")  # library INFO: not the user's business
    logging.getLogger("medseg.test").info("[1/1] case.nii.gz -> out/case_seg.nii.gz")
    logging.getLogger("pylibjpeg.utils").debug("Found plugin 'libjpeg'")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert all(LINE.match(line) for line in lines), lines
    assert [line.split(" ", 2)[2] for line in lines] == [
        "medseg_test_ignite.TimeLimit: disk almost full", "medseg_test_monai.bundle: disk almost full",
        "medseg.test: [1/1] case.nii.gz -> out/case_seg.nii.gz"]


def test_loggers_made_before_setup_are_routed_too(capsys: pytest.CaptureFixture[str]) -> None:
    early = logging.getLogger("medseg_test_early")
    early.propagate = False
    early.addHandler(logging.StreamHandler())
    setup_logging()
    early.warning("routed")
    early.propagate = False  # a library turning it off again (MONAI's get_logger does, on every call)
    early.warning("still routed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(LINE.match(line) for line in lines), lines


def test_debug_shows_medseg_debug_but_no_library_debug(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(debug=True)
    logging.getLogger("medseg.test").debug("medseg detail")
    logging.getLogger("pylibjpeg.utils").debug("Found plugin 'openjpeg'")
    logging.getLogger("matplotlib").debug("CONFIGDIR=/root/.config/matplotlib")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("D medseg.test: medseg detail"), lines
    setup_logging(quiet=True)
    logging.getLogger("medseg.test").info("progress")
    assert capsys.readouterr().err == ""


def test_library_warnings_are_silenced_medseg_warnings_logged_in_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        setup_logging(debug=True)
        warnings.warn_explicit("Orientationd labels default will change", FutureWarning,
                               "monai/utils/deprecate_utils.py", 320, module="monai.utils.deprecate_utils")
        warnings.warn_explicit("NvImgCodecPydicomReader did not register", UserWarning,
                               "monai/data/image_reader.py", 1166, module="monai.data.image_reader")
        warnings.warn_explicit("a medseg warning\nsecond line", UserWarning, "medseg/x.py", 7, module="medseg.x")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]), lines
    assert "py.warnings: UserWarning: a medseg warning (medseg/x.py:7)" in lines[0]


def test_the_bundles_logging_conf_is_the_clis_format() -> None:
    for bundle in sorted(BUNDLES.iterdir()):
        assert (bundle / "configs" / "logging.conf").read_text(encoding="utf-8") == BUNDLE_LOGGING_CONF, bundle.name


def test_the_bundle_logging_conf_routes_monais_own_loggers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """What ``python -m monai.bundle run`` does with the file: MONAI's loggers end up in the one format."""
    import io
    import logging.config

    from monai.apps.utils import get_logger

    scripts = get_logger("monai.bundle.scripts")  # created at import by MONAI with its own stdout handler
    logging.config.fileConfig(io.StringIO(BUNDLE_LOGGING_CONF), disable_existing_loggers=False)
    scripts.info("--- input summary of monai.bundle.scripts.run ---")
    logging.getLogger("ignite.engine.engine.SupervisedEvaluator").info("Epoch[1] Complete.")
    logging.getLogger("monai.transforms").info("chatter")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 2 and all(LINE.match(line) for line in lines), (captured.out, lines)


def test_held_info_prints_notes_only_when_the_block_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    """Notes logged while input is read are printed after the block, or not at all if it raises; warnings
    pass at once (an error about the input must be the only line)."""
    from medseg.logs import held_info, setup_logging

    setup_logging()
    log = logging.getLogger("medseg.test")
    with pytest.raises(ValueError), held_info():
        log.info("read 3 series")
        raise ValueError("bad input")
    assert capsys.readouterr().err == ""
    with held_info():
        log.info("first")
        log.warning("careful")
        log.info("second")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["careful", "first", "second"]
