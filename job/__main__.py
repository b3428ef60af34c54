import gc
import logging
import multiprocessing
import multiprocessing.util
import os
import sys

from job.stop import StopRequest

stop = StopRequest().install()  # before the slow imports: no signal may meet Python's default action

from job.cli import main  # noqa: E402

code = main(stop=stop)
# Everything is written and flushed by now. Leave without the interpreter's teardown of torch's
# modules (~1 s a run); the collection first shuts DataLoader workers down with their loaders.
gc.collect()
# A worker still alive (its loader held by an error's frames) would outlive us for ever: forkserver
# workers are the forkserver's children and never notice that we are gone, and they keep the
# forkserver, the resource tracker and our stdout open (a caller reading the pipe waits for ever).
for child in multiprocessing.active_children():  # any left: ended the hard way
    child.terminate()
    child.join(timeout=2)
# What the interpreter's exit would do for multiprocessing (atexit, which os._exit skips): run its
# finalizers, which unregister the semaphores of the loaders' queues. Left registered (a queue held
# by an error's frames), the resource tracker printed "leaked semaphore objects" after our last line.
multiprocessing.util._exit_function()  # type: ignore[attr-defined]
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
