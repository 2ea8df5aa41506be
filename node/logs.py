"""No patient data in anything the node prints: library warnings and log records redacted.

highdicom and pydicom quote the values they warn about (``The string "DOE^JOHN" is unlikely to
represent the intended person name``, ``Invalid value for VR PN: 'DOE^JOHN'``), and pydicom also
logs them. :func:`install` routes warnings into logging and replaces every quoted value in the
records of those libraries with ``'…'``, in the node, in its worker processes and in
``vesalius process``. The node's own log lines never take values from a data set but UIDs.
"""

from __future__ import annotations

import logging
import re

QUOTED = re.compile(r"""(["'])(?:(?!\1).)*\1""")
REDACTED = "'…'"
LIBRARY_LOGGERS = ("py.warnings", "pydicom", "highdicom", "pynetdicom")


def redact(text: str) -> str:
    """``text`` with every single- or double-quoted value replaced by ``'…'``."""
    return QUOTED.sub(REDACTED, text)


class RedactQuoted(logging.Filter):
    """Replace quoted values in the message of records from data-set handling libraries."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(record.name == n or record.name.startswith(f"{n}.") for n in LIBRARY_LOGGERS):
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


def install() -> None:
    """Capture warnings into logging and redact library records (idempotent; call once logging is
    configured, and in every worker process)."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not root.handlers:  # a worker process: what logging's last resort would print, redacted
        handler: logging.Handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)
    redaction = RedactQuoted()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQuoted) for f in logger.filters):
            logger.addFilter(redaction)
    for handler in root.handlers:  # records of child loggers reach these
        if not any(isinstance(f, RedactQuoted) for f in handler.filters):
            handler.addFilter(redaction)
