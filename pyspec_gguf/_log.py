"""llama.cpp's log, routed to ``logging.getLogger("pyspec_gguf")``.

Quiet by default (errors only); ``set_verbose(True)`` or a DEBUG level on the
logger before the first model loads shows everything llama.cpp says.
"""

import logging

from . import _native

logger = logging.getLogger("pyspec_gguf")

_TO_LOGGING = {
    _native.LOG_DEBUG: logging.DEBUG,
    _native.LOG_INFO: logging.INFO,
    _native.LOG_WARN: logging.WARNING,
    _native.LOG_ERROR: logging.ERROR,
}


def _sink(level: int, text: str) -> None:
    text = text.rstrip("\n")
    if text:
        logger.log(_TO_LOGGING.get(level, logging.INFO), "%s", text)


def set_verbose(verbose: bool) -> None:
    """Forward all of llama.cpp's messages (True) or only its errors (False)."""
    _native.set_log_sink(_sink, _native.LOG_DEBUG if verbose else _native.LOG_ERROR)
    if verbose and logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.DEBUG)
        if not logging.getLogger().handlers and not logger.handlers:
            logger.addHandler(logging.StreamHandler())


set_verbose(logger.isEnabledFor(logging.DEBUG))
