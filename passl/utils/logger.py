"""Console + file logging; only rank 0 writes to the console under several processes.

The log file is opened only once a run has been built (:func:`open_log_file`): until then
records are held in memory, so a run that fails at start-up leaves an existing output_dir
exactly as it was. A record logged with ``extra=FILE_ONLY`` goes to the file and not to the
console (the progress bar already shows it there).
"""
import logging
import logging.handlers
import os
import sys

from passl.io.safe_write import write_failure

LOGGER_NAME = "passl"
#: ``logger.info(msg, extra=FILE_ONLY)``: write to the log file only.
FILE_ONLY = {"file_only": True}
_FORMAT = logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


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


def _not_file_only(record):
    return not getattr(record, "file_only", False)


def log_file_name(filename, rank):
    """``train.log`` on rank 0, ``train.rank{N}.log`` on the others (kept apart, not interleaved)."""
    return filename if rank == 0 else filename.replace(".log", f".rank{rank}.log")


def setup_logger(output_dir=None, rank=0, filename="train.log", defer_file=False):
    """Configure the 'passl' logger: console on rank 0, ``output_dir/filename`` on every rank.

    With ``defer_file`` the file is not created yet: records wait in memory until
    :func:`open_log_file` writes them and opens the file.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(_FORMAT)
        console.addFilter(_not_file_only)
        logger.addHandler(console)
    if defer_file:
        # capacity and flush level out of reach: nothing leaves memory before open_log_file
        logger.addHandler(logging.handlers.MemoryHandler(capacity=sys.maxsize,
                                                         flushLevel=logging.CRITICAL + 1))
    elif output_dir:
        open_log_file(output_dir, rank, filename)
    return logger


def open_log_file(output_dir, rank=0, filename="train.log"):
    """Start writing the log to ``output_dir``, first the records held since start-up."""
    logger = logging.getLogger(LOGGER_NAME)
    os.makedirs(output_dir, exist_ok=True)
    file_handler = LogFileHandler(os.path.join(output_dir, log_file_name(filename, rank)))
    file_handler.setFormatter(_FORMAT)
    for held in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(file_handler)
        held.flush()
        logger.removeHandler(held)
    logger.addHandler(file_handler)


def get_logger():
    return logging.getLogger(LOGGER_NAME)
