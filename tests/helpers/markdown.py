"""Read the tutorial's Markdown: its fenced code blocks, the marker comment before each, and their roles.

A chapter's code blocks, and what tests/test_tutorial.py does with each:

    ```python            run, in order, in one namespace per chapter
    ```text              right after a ```python block (blank lines between at most): that block's output,
                         compared with what it prints; anywhere else: a figure or a listing, left alone
    ```console           `$ ` lines are commands, run in a scratch folder; the other lines are their output
    ```bash              every line is a command (comments and blank lines aside)

A marker is an HTML comment on the last non-blank line before a block (invisible on GitHub):

    <!-- quote: deebert/exit.py -->    the block is an excerpt of that file: checked verbatim, not run.
                                       A line `...` stands for lines left out.
    <!-- not run: needs a GPU -->     the block is not run; the test counts these, per chapter
    <!-- shows an error -->           the commands must FAIL, and the block's `error:` line must appear

A fence must start its line and name only a language: another (indented in a list item, or ```python x)
would be invisible to these checks, so `read_blocks` refuses it. `images` lists the pictures a chapter shows,
`![what it shows](figures/NAME.png)`.
"""

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\S*)\s*$")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
MARKER = re.compile(r"^<!--\s*(quote|not run|shows an error)\s*(?::\s*(.*?))?\s*-->$")
LANGUAGES = ("python", "text", "console", "bash")


@dataclass
class Block:
    language: str
    code: str  # the lines between the fences, joined with newlines
    line: int  # 1-based line of the opening fence, for messages
    marker: str | None = None  # "quote", "not run", "shows an error", or None
    argument: str | None = None  # the quoted file, or why a block is not run
    output: "Block | None" = None  # for a ```python block: the ```text block right after it

    def where(self, path) -> str:
        return f"{Path(path).name}:{self.line}"


def read_blocks(path) -> list[Block]:
    """Every fenced block of a Markdown file, with its marker; raises ValueError on a malformed file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    blocks = []
    last = None  # the last non-blank line before here: its text, or the Block whose closing fence it was
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].lstrip().startswith("```"):
                raise ValueError(f"{Path(path).name}:{i + 1}: a code fence the tests cannot read: start it at the "
                                 "line's beginning, with only a language after the backticks")
            if lines[i].strip():
                last = lines[i].strip()
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"{Path(path).name}:{start + 1}: the code block is never closed")
        block = Block(fence.group(1), "\n".join(lines[start + 1 : i]), start + 1)
        if isinstance(last, str) and last.startswith("<!--"):
            marker = MARKER.match(last)
            if not marker:
                raise ValueError(f"{block.where(path)}: unknown marker {last!r}")
            block.marker, block.argument = marker.group(1), marker.group(2)
        if isinstance(last, Block) and last.language == "python" and block.language == "text":
            last.output = block
        blocks.append(block)
        last = block
        i += 1
    return blocks


def images(path) -> list[str]:
    """The targets of a Markdown file's images, in order: ["figures/model-sst-2.png", ...]."""
    return IMAGE.findall(Path(path).read_text(encoding="utf-8"))


def shell_commands(block: Block) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown after it) for each command of a ```console or ```bash block.

    A line that ends with a backslash continues on the next line, as in the shell.
    """
    commands, current = [], None
    lines = block.code.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if block.language == "console":
            is_command = line.startswith("$ ")
        else:
            is_command = bool(line.strip()) and not line.lstrip().startswith("#")
        if is_command:
            text = line[2:] if block.language == "console" else line
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            current = (text.strip(), [])
            commands.append(current)
        elif current is not None and block.language == "console":
            current[1].append(line)
        i += 1
    return commands


def matches(expected: str, actual: str) -> bool:
    """Whether `actual` is `expected`, line by line (trailing spaces and blank lines aside),
    where a line `...` in `expected` stands for any number of lines, none included."""
    pattern = []
    for line in expected.rstrip("\n").splitlines():
        if line.strip() == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            pattern.append(re.escape(line.rstrip()) + r"\n")
    actual = "\n".join(line.rstrip() for line in actual.rstrip("\n").splitlines()) + "\n"
    return re.fullmatch("".join(pattern), actual) is not None


def excerpt_found(excerpt: str, source: str) -> bool:
    """Whether every piece of `excerpt` (pieces separated by lines `...`) appears verbatim in `source`, in order."""
    pieces, piece = [], []
    for line in excerpt.splitlines():
        if line.strip() == "...":
            pieces.append("\n".join(piece))
            piece = []
        else:
            piece.append(line)
    pieces.append("\n".join(piece))
    position = 0
    for text in (p for p in pieces if p.strip()):
        found = source.find(text, position)
        if found < 0:
            return False
        position = found + len(text)
    return True
