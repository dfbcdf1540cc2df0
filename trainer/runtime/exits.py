"""The exit status of a run, carried by the error that ends it, so that an entry point has one ``except``.

0 done; 1 a failure in training; 2 a configuration, data, lock or checkpoint for the user to fix; 75 stopped on a
signal after a save ("temporary failure": a scheduler may run it again).
"""
FAILED, TO_FIX, REQUEUE = 1, 2, 75  # 0, done, is a return, not an error


class RunError(Exception):
    """An error that ends a run with ``status``; ``report()`` is what the user reads on stderr."""
    status = FAILED
    label = "error: "

    def report(self) -> str:
        """The message the user reads."""
        return f"{self.label}{self}"


class ToFix(RunError):
    """Something the user fixes before running again (a flag, a file, an allocation): exit 2."""
    status = TO_FIX
