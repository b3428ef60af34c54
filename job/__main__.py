import gc
import logging
import os
import sys

from job.stop import StopRequest

stop = StopRequest().install()  # before the slow imports: no signal may meet Python's default action

from job.cli import main  # noqa: E402

code = main(stop=stop)
# Everything is written and flushed by now. Leave without the interpreter's teardown of torch's
# modules (~1 s a run); the collection first shuts DataLoader workers down with their loaders.
gc.collect()
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
