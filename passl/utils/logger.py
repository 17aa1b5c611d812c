"""Console + file logging; only rank 0 writes to the console under several processes."""
import logging
import os
import sys

from passl.io.safe_write import write_failure

LOGGER_NAME = "passl"


class LogFileHandler(logging.FileHandler):
    """A log file that, when it cannot be written (a full disk), says so once in one line
    instead of printing logging's traceback for every record; the run goes on (a checkpoint
    or metrics write that fails too stops it)."""

    reported = False

    def handleError(self, record):
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
        elif not self.reported:
            self.reported = True
            print(f"warning: {write_failure(self.baseFilename, error)}; its log lines are lost",
                  file=sys.stderr)


def setup_logger(output_dir=None, rank=0, filename="train.log"):
    """Configure the 'passl' logger: console on rank 0, ``output_dir/filename`` on every rank.

    Ranks other than 0 write to ``train.rank{N}.log`` so their messages are kept
    without interleaving into rank 0's file.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        name = filename if rank == 0 else filename.replace(".log", f".rank{rank}.log")
        file_handler = LogFileHandler(os.path.join(output_dir, name))
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def get_logger():
    return logging.getLogger(LOGGER_NAME)
