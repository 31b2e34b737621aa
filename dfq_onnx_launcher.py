"""The `dfq-onnx` console script. Interrupt rules (README "Bad input"):

- Ctrl-C anywhere before the output is renamed into place, imports included, prints one line
  `error: interrupted` and exits 130. Python's own handler is installed here, first thing, and the
  CLI installs it again once the heavy imports are done (a library may reset SIGINT to its
  default action, which would end the process without a word); an import that an interrupt broke
  (onnxruntime turns it into `ImportError: initialization failed`) counts as the interrupt.
- Once the output is in place the run has succeeded: a later Ctrl-C exits 0 (see cli.py).
- Started with SIGINT ignored (nohup, a background job), the command keeps ignoring it.
"""
import signal
import sys
import time

STARTED = time.perf_counter()  # the summary's "since the command started" (imports included)


def interrupt_handler() -> None:
    """Python's default SIGINT handler (KeyboardInterrupt), unless SIGINT was ignored at start."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    interrupt_handler()
    interrupted = False

    def note(signum, frame):
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, note)
    try:
        from dfq_onnx.cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except ImportError:
        if not interrupted:
            raise
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    interrupt_handler()
    cli()
