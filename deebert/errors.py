"""The one exception type this project raises for bad input (a file, a flag, a checkpoint).

Its message is one line that names the problem and the fix; `train.py` and `infer.py` print it as
`error: <message>` instead of a traceback. Anything else is a bug and keeps its traceback.
"""


class DeeBertError(Exception):
    """Bad input: the message is one line, names what is wrong, and says what to do."""
