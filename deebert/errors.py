"""Bad input: the one exception type this project raises for it (a file, a flag, a checkpoint), the command
line's checks that raise it, and how the scripts report it: one line `error: <message>` that names the problem
and the fix, exit code 2, no traceback. Anything else is a bug and keeps its traceback."""

import argparse
import sys


class DeeBertError(Exception):
    """Bad input: the message is one line, names what is wrong, and says what to do."""

    def report(self) -> int:
        """Print the message as one line `error: ...` on stderr; return 2, the scripts' exit code for bad input."""
        print(f"error: {' '.join(str(self).splitlines())}", file=sys.stderr)
        return 2


def number(kind=float, low: float = 0, high: float = float("inf"), open_ends: bool = False):
    """argparse type: a `kind` number in [low, high], or in (low, high) with open_ends; NaN fails both."""
    def parse(text):
        value = kind(text)  # a ValueError, which argparse words as "invalid float value: 'abc'"
        if not (low < value < high if open_ends else low <= value <= high):
            span = f"({low:g}, {high:g})" if open_ends else f"[{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}; pass a value in that range")
        return value
    parse.__name__ = kind.__name__  # the name argparse gives the type in its message
    return parse


class Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value out of range) are a DeeBertError: one line, no usage dump."""

    def error(self, message):
        raise DeeBertError(f"{message}; see python {self.prog} --help")
