import sys

from job.signals import StopRequest

stop = StopRequest().install()  # before the slow imports: no signal may meet Python's default action

from job.cli import main  # noqa: E402

sys.exit(main(stop=stop))
