"""Keep Lightning's advertisements out of the output.

Lightning 2.6 prints two "Tip: ... litlogger / litmodels" lines on every run, through the logger
of its rank-zero helpers, with no setting to turn them off (Lightning issue #21294). A filter on
that logger drops those records alone; every other Lightning message stays.
"""

from __future__ import annotations

import logging

ADVERT_PREFIX = "💡 Tip:"
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIX)


def silence_lightning_tips() -> None:
    """Install the filter (once) on the loggers Lightning's ``rank_zero_info`` writes to."""
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropAdverts) for f in logger.filters):
            logger.addFilter(DropAdverts())
