"""One log format for everything the ``medseg`` command prints, and library noise kept out of it.

:func:`setup_logging` (called once by the CLI) installs a single stderr handler on the root logger
with :data:`LOG_FORMAT` (``20:04:45 I medseg.inference.predictor: [1/1] scan.nii.gz -> out/...``)
and routes every other logger through it:

* Ignite's ``setup_logger`` and MONAI's ``get_logger`` give their loggers a console handler of their
  own (another format, on stdout for MONAI) and turn propagation off. Loggers created from then on
  are :class:`RoutedLogger`\\ s, which drop console handlers and always propagate; loggers that
  already exist are converted the same way.
* Records of other libraries reach the console only from WARNING up (no pylibjpeg plugin lists or
  matplotlib font searches under ``--debug``); medseg's own records at the chosen level.
* Python warnings of libraries (MONAI's FutureWarnings, deprecations) are not the user's business
  and are ignored; medseg's own warnings are logged in the same format (``py.warnings``). Filters
  given with ``python -W`` or ``PYTHONWARNINGS`` are left alone.

The bundles' ``configs/logging.conf`` (``python -m monai.bundle run``) uses the same format.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
from collections.abc import Callable, Iterator

__all__ = ["BUNDLE_LOGGING_CONF", "DATE_FORMAT", "LOG_FORMAT", "RoutedLogger", "held_info", "release_held", "setup_logging"]

#: The format of every log line the CLI prints (the bundles' logging.conf uses the same).
LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
#: Loggers whose records are shown at the CLI's level (others from WARNING up).
OWN_LOGGERS = ("medseg", "py.warnings")
#: Library loggers that warn about nothing the user can act on, and the level they are held to:
#: with pydicom installed, MONAI's image readers warn on every image that the (CUDA-only) nvImageCodec
#: pydicom plugin is missing; medseg decodes DICOM through pydicom's own plugins.
QUIET_LOGGERS = {"monai.data.nvimgcodec_pydicom_plugin": logging.ERROR}


#: Levels of the loggers a bundle's ``configs/logging.conf`` configures: MONAI's ``get_logger`` gives
#: its loggers a stdout handler of their own and turns their propagation off; naming them in the file
#: removes that handler and routes them through the root's. Library INFO chatter stays out.
BUNDLE_LOGGER_LEVELS: dict[str, str] = {
    "medseg": "INFO", "ignite": "INFO", "monai": "WARNING", "monai.bundle.scripts": "INFO",
    "monai.bundle.workflows": "INFO", "monai.apps": "WARNING", "monai.transforms.compose": "WARNING",
    "monai.networks.utils": "WARNING", **{name: logging.getLevelName(level) for name, level in QUIET_LOGGERS.items()},
}


def _bundle_logging_conf() -> str:
    """The text of :data:`BUNDLE_LOGGING_CONF` (a ``logging.config.fileConfig`` file)."""
    keys = {name: name.replace(".", "_") for name in BUNDLE_LOGGER_LEVELS}
    sections = [
        "# Logging of `python -m monai.bundle run` for this bundle: the format of the medseg command",
        "# (medseg.logs.LOG_FORMAT), on stderr; MONAI's and Ignite's loggers routed through the root's handler,",
        "# library INFO chatter left out (generated from medseg.logs.BUNDLE_LOGGER_LEVELS).",
        "[loggers]", "keys=root," + ",".join(keys.values()), "",
        "[handlers]", "keys=stderr", "",
        "[formatters]", "keys=medseg", "",
        "[logger_root]", "level=WARNING", "handlers=stderr", "",
    ]
    for name, level in BUNDLE_LOGGER_LEVELS.items():
        sections += [f"[logger_{keys[name]}]", f"level={level}", "handlers=", f"qualname={name}", "propagate=1", ""]
    sections += ["[handler_stderr]", "class=StreamHandler", "level=NOTSET", "formatter=medseg", "args=(sys.stderr,)",
                 "", "[formatter_medseg]", f"format={LOG_FORMAT}", f"datefmt={DATE_FORMAT}"]
    return "\n".join(sections) + "\n"


#: A bundle's ``configs/logging.conf`` (what ``python -m monai.bundle run`` applies): the CLI's format
#: on stderr, MONAI's self-handled loggers routed through the root, library INFO chatter left out.
BUNDLE_LOGGING_CONF = _bundle_logging_conf()

def _is_console(handler: logging.Handler) -> bool:
    """A plain StreamHandler on stdout or stderr (not a file handler, not the root's own)."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


class RoutedLogger(logging.Logger):
    """A logger whose records always reach the root handler: console handlers a library attaches
    to it are not added, and turning propagation off has no effect. File handlers are kept."""

    @property
    def propagate(self) -> bool:
        return True

    @propagate.setter
    def propagate(self, value: bool) -> None:
        pass

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 - logging's name
        if not _is_console(hdlr):
            super().addHandler(hdlr)


class _LevelFilter(logging.Filter):
    """medseg's records (and medseg's warnings) at ``level``, everyone else's from WARNING up."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        own = any(record.name == name or record.name.startswith(name + ".") for name in OWN_LOGGERS)
        return record.levelno >= (self.level if own else max(self.level, logging.WARNING))


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """One line per warning (``logging.captureWarnings`` logs what this returns)."""
    return f"{category.__name__}: {str(message).splitlines()[0] if str(message) else ''} ({filename}:{lineno})"


def setup_logging(debug: bool = False, quiet: bool = False, prefix: str = "") -> None:
    """Configure logging and warnings for the CLI (see the module doc); safe to call again.

    ``debug``: medseg's DEBUG records too; ``quiet``: only warnings and errors; ``prefix``: written in brackets
    before each record's logger name (a worker process's lines among its siblings').
    """
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    form = LOG_FORMAT if not prefix else LOG_FORMAT.replace("%(name)s", f"[{prefix.replace('%', '%%')}] %(name)s")
    handler.setFormatter(logging.Formatter(form, DATE_FORMAT))
    handler.addFilter(_LevelFilter(level))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.setLoggerClass(RoutedLogger)
    for logger in list(logging.root.manager.loggerDict.values()):
        if type(logger) is logging.Logger:  # created before this call (placeholders become RoutedLoggers later)
            for existing in [h for h in logger.handlers if _is_console(h)]:
                logger.removeHandler(existing)
            logger.__class__ = RoutedLogger
    logging.getLogger("medseg").setLevel(level)
    for name, quieter in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quieter)
    logging.captureWarnings(False)  # again: a previous call's capture may have been undone (catch_warnings)
    logging.captureWarnings(True)
    warnings.formatwarning = _format_warning
    if not sys.warnoptions:
        warnings.resetwarnings()
        warnings.filterwarnings("ignore")  # libraries' warnings: not the user's business
        warnings.filterwarnings("default", module=r"medseg(\.|$)")  # medseg's own: shown once per place


class _Hold(logging.Filter):
    """Keeps records below WARNING back (in ``held``) instead of letting a handler emit them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            if not self.held or self.held[-1] is not record:  # several root handlers see the same record
                self.held.append(record)
            return False
        return True


#: The release functions of the held_info() blocks in progress (see release_held).
_HOLDS: list[Callable[[], None]] = []


@contextlib.contextmanager
def held_info() -> Iterator[None]:
    """Hold informational records back while input is read and checked: emitted in order when the block
    ends normally (or :func:`release_held` is called inside it), dropped when it raises, so that an error
    about the input is the only line printed. Warnings and errors pass at once."""
    handlers = list(logging.getLogger().handlers)
    hold = _Hold()
    for handler in handlers:
        handler.addFilter(hold)
    ended = False

    def end(emit: bool) -> None:
        nonlocal ended
        if ended:
            return
        ended = True
        for handler in handlers:
            handler.removeFilter(hold)
        for record in hold.held if emit else ():
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    release = functools.partial(end, True)
    _HOLDS.append(release)
    try:
        yield
    except BaseException:
        end(False)
        raise
    finally:
        _HOLDS.remove(release)
    end(True)


def release_held() -> None:
    """Every input has been checked (a training run starts writing): end the holds of the
    :func:`held_info` blocks in progress, emitting what they held; later records pass at once."""
    for release in _HOLDS:
        release()
