"""The `dfq-onnx` console script: an interrupt while the heavy imports load exits like one during
the work (one line, status 130), not with a traceback."""
import sys
import time

STARTED = time.perf_counter()  # the summary's "since the command started" (imports included)


def main() -> None:
    try:
        from dfq_onnx.cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    cli()
