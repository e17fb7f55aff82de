"""The one exception type this project raises for bad input.

Every check on user input (a file, a flag, a checkpoint) raises `DeeBertError` with a one-line
message that names the problem and the fix. The scripts (`train.py`, `infer.py`) catch it and
print `error: <message>` instead of a traceback; anything else is a bug and keeps its traceback.
"""


class DeeBertError(Exception):
    """Bad input: the message is one line, names what is wrong, and says what to do."""
