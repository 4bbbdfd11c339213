"""A quiet console for long runs: one live line and the summary on the terminal, the rest in a log file.

What would otherwise interleave with the live line goes to the log file instead:
Python logging (ours, Ray's, Ray Data's, faiss's loader), warnings, the Ray
workers' output that ``log_to_driver`` forwards, and whatever Ray's C++ core
writes to file descriptor 2 of this process. ``-v`` keeps it all on the console.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from raycompat.storage.artifacts import local_path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The training loop's per-epoch line (raycompat.pipeline.train): "rank 0 epoch 3: {'loss': ...}".
_EPOCH_LINE = re.compile(r"rank 0 epoch (\d+): (\{.*\})")


def log_path_for(output_dir: str, command: str) -> Path:
    """Where a run's log goes: ``<output_dir>/logs/`` when local, else this machine's temp directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    local = local_path(output_dir)
    base = local / "logs" if local is not None else Path(tempfile.gettempdir()) / "raycompat-logs"
    return base / f"{command}-{stamp}-{os.getpid()}.log"


class LiveLine:
    """One ``tqdm`` line over the stages: the stage, then rows/s (extraction) or epoch and loss (training).

    It is the extraction's progress hook (``total`` then ``update(n)``) and reads the
    training epochs out of the forwarded worker output (:meth:`worker_lines`).
    """

    def __init__(self, stages: list[str], epochs: dict[str, int], stream, desc: str = "demo",
                 unit: str = "stage") -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=len(stages), desc=desc, unit=unit, file=stream, dynamic_ncols=True)
        self._epochs = epochs
        self._stage: Optional[str] = None
        self._rows_total: Optional[float] = None
        self._rows = 0
        self._t0 = time.perf_counter()

    def stage(self, name: str) -> None:
        """A new stage starts (the previous one is done)."""
        if self._stage is not None:
            self._bar.update(1)
        self._stage = name
        self._bar.set_postfix_str(name)

    @property
    def total(self) -> Optional[float]:
        """Rows the current extraction has to do (set by run_extraction)."""
        return self._rows_total

    @total.setter
    def total(self, value: Optional[float]) -> None:
        # run_extraction sets total once per split: the rate restarts with it.
        self._rows_total, self._rows, self._t0 = value, 0, time.perf_counter()

    def update(self, n: int) -> None:
        """``n`` more rows extracted."""
        self._rows += n
        rate = self._rows / max(time.perf_counter() - self._t0, 1e-9)
        total = f"/{int(self._rows_total)}" if self._rows_total else ""
        self._bar.set_postfix_str(f"{self._stage}: {self._rows}{total} rows, {rate:.0f} rows/s")

    def worker_lines(self, lines: list[str]) -> None:
        """Show the epoch and loss of a training worker's per-epoch line, if ``lines`` hold one."""
        for line in lines:
            m = _EPOCH_LINE.search(line)
            if m and self._stage in self._epochs:
                loss = ast.literal_eval(m.group(2)).get("loss")
                self._bar.set_postfix_str(f"{self._stage}: epoch {m.group(1)}/{self._epochs[self._stage]}"
                                          + (f", loss {loss:.4f}" if loss is not None else ""))

    def step(self, line: str) -> None:
        """A progress line ``"<unit>: <what>"``: a new unit advances the bar, the same unit only shows ``line``."""
        unit = line.split(":", 1)[0]
        if self._stage is None or unit != self._stage.split(":", 1)[0]:
            self.stage(line)
        else:
            self._stage = line
            self._bar.set_postfix_str(line)

    def close(self) -> None:
        """The last stage is done."""
        if self._stage is not None:
            self._bar.update(1)
        self._bar.close()


class _WarningsAbove(logging.Handler):
    """Our own warnings (e.g. the dataset fallback) stay on the console, printed above the live line."""

    def __init__(self, stream) -> None:
        super().__init__(logging.WARNING)
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"{record.levelname.lower()}: {record.getMessage()}", file=self._stream)


def _divert_stream_handlers(handler: logging.Handler) -> None:
    """Replace every console handler of every logger (Ray and Ray Data install their own) by ``handler``."""
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        streams = [h for h in logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for h in streams:
            logger.removeHandler(h)
        if streams or logger is logging.getLogger():
            logger.addHandler(handler)


def _forward_worker_output(sink, live: LiveLine) -> list:
    """Send the Ray workers' forwarded output to ``sink`` (and to the live line) instead of the console.

    Ray prints it from a driver thread through a dispatcher with one handler,
    ``ray_print_logs``; swapping that handler is the only hook it offers. Returns the
    handlers it replaced, for :func:`_restore_worker_output`.
    """
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    def write(data: dict) -> None:
        name = data.get("actor_name") or data.get("task_name") or "worker"
        sink.write("".join(f"({name} pid={data.get('pid')}) {line}\n" for line in data["lines"]))
        sink.flush()
        live.worker_lines(data["lines"])

    saved = [pair for pair in dispatcher.handlers if pair[0] == "ray_print_logs"]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", write)
    return saved


def _restore_worker_output(saved: list) -> None:
    """Put back the handlers :func:`_forward_worker_output` replaced, if Ray is still connected.

    (A Ray session that outlives the command, as in a test module; after ``ray.shutdown``
    Ray adds its own again on the next ``ray.init``.)
    """
    import ray
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    for name, handler in saved if ray.is_initialized() else []:
        dispatcher.add_handler(name, handler)


@contextmanager
def quiet_console(log_file: Path, stages: list[str], epochs: dict[str, int], desc: str = "demo",
                  unit: str = "stage") -> Iterator["QuietConsole"]:
    """Run the body with only the live line (and what it prints to stdout) on the console.

    Must be entered before Ray starts: Ray's C++ core writes to file descriptor 2,
    which is pointed at the log file for the duration; ``sys.stderr`` keeps the
    terminal. Call :meth:`QuietConsole.attach_ray` once Ray is up.
    """
    import ray.data

    log_file.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log_file, "a", buffering=1)
    saved_fd = os.dup(2)
    saved_stderr = sys.stderr
    sys.stderr.flush()
    os.dup2(sink.fileno(), 2)
    sys.stderr = os.fdopen(os.dup(saved_fd), "w", buffering=1)
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    saved_level = root.level
    root.setLevel(logging.INFO)  # faiss's loader and Ray's progress log at INFO: into the file
    logging.captureWarnings(True)
    _divert_stream_handlers(handler)
    # Ray Data's progress bars (or, off a terminal, its progress log blocks): the live line replaces them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    console = QuietConsole(LiveLine(stages, epochs, sys.stderr, desc, unit), sink, handler, log_file)
    ours = _WarningsAbove(sys.stderr)
    logging.getLogger("raycompat").addHandler(ours)
    try:
        yield console
    finally:
        console.detach_ray()
        console.live.close()
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        sys.stderr.close()
        sys.stderr = saved_stderr
        logging.captureWarnings(False)
        root.removeHandler(handler)
        logging.getLogger("raycompat").removeHandler(ours)
        root.setLevel(saved_level)
        sink.close()


@contextmanager
def quiet_ray_command(output_dir: str, command: str, stages: list[str], epochs: dict[str, int],
                      desc: Optional[str] = None, unit: str = "stage", ray_cfg=None) -> Iterator["QuietConsole"]:
    """A command's body on Ray under :func:`quiet_console`, its log in :func:`log_path_for` (the path printed first).

    With ``ray_cfg`` Ray starts here, its output diverted from the start; without, the body starts
    it and calls ``console.attach_ray()``. A runtime started while the body ran goes when it ends,
    on success, error or Ctrl-C, while the output is still diverted (Ray's last worker lines arrive
    until then); one already connected on entry (a caller's) stays.
    """
    import ray

    from raycompat.pipeline.ray_session import init_ray

    log_file = log_path_for(output_dir, command)
    print(f"log: {log_file}", file=sys.stderr)
    started = not ray.is_initialized()
    with quiet_console(log_file, stages, epochs, desc=desc or command, unit=unit) as console:
        try:
            if ray_cfg is not None:
                init_ray(ray_cfg)
                console.attach_ray()
            yield console
        finally:
            if started and ray.is_initialized():
                ray.shutdown()


class QuietConsole:
    """What :func:`quiet_console` yields: the live line, the log file, and the hook to quieten Ray once it runs."""

    def __init__(self, live: LiveLine, sink, handler: logging.Handler, log_file: Path) -> None:
        self.live = live
        self.log_file = log_file
        self._sink = sink
        self._handler = handler
        self._replaced: Optional[list] = None

    def attach_ray(self) -> None:
        """Divert what ``ray.init`` set up: its loggers' console handlers and the workers' forwarded output."""
        _divert_stream_handlers(self._handler)
        self._replaced = _forward_worker_output(self._sink, self.live)

    def detach_ray(self) -> None:
        """Stop forwarding worker output to the log file (it closes): Ray's own printing again, if still connected."""
        if self._replaced is not None:
            _restore_worker_output(self._replaced)
            self._replaced = None
