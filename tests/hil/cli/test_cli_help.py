"""`hil --help` teaches: commands in the order a lab uses them, and no help text breaks mid-line.

Rich keeps every newline of a help text, so a docstring paragraph wrapped at the source's width
comes out ragged at any other width: a short line whose paragraph continues on the next line
with a word that would have fitted. Rich's own wrapping never does that, so finding one such
pair at any width finds a hard break in a help text.
"""

import re
import subprocess
import sys

import pytest
import typer
from cli_run import run_hil

from hil.cli import app

LAB_ORDER = [
    "bench",
    "devices",
    "estimate",
    "teacher",
    "train",
    "calibrate",
    "capture",
    "finetune",
    "evaluate",
    "demo",
    "sim",
]
SLACK = 0  # columns a continuation's first word may miss by without counting as a ragged break
TYPER_NOTES = ("[default:", "[required]", "[env var:")  # placed as whole units, not wrapped

# `hil calibrate --help` at 100 columns before the help texts were unwrapped
RAGGED = """\
 Writes OUT/calibration.h5 (every fitted quantity), OUT/result.json and PNG plots. On a
 simulated bench the result also compares each fitted quantity with the ground truth.

╭─ Commands ───────────────────────────────────────────────────────────────────────────────────────╮
│ devices    List the installed driver backends, then open each device of the bench file once.     │
│ calibrate  Measure the fabricated frontend: exposure, dark, stray light, photon transfer,        │
│            display                                                                               │
│            response, geometry, kernels; then check the result by predicting frames of new        │
│            images.                                                                               │
│ train      Train the optical student in simulation (frontend and backend jointly).               │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯
"""


def command_paths(group=None, path=()):
    """Every command and group of the app, as argv prefixes: (), ("bench",), ("bench", "init")..."""
    group = group or typer.main.get_command(app)
    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from command_paths(command, (*path, name))


def cells(line: str) -> tuple[list[tuple[int, int, str]], int]:
    """Text spans (start, end, text) of a rendered line split at runs of 2+ spaces, and the
    column where its text must end (a panel's right border less its padding)."""
    inner, right = line, len(line)
    if line.startswith("│") and line.rstrip().endswith("│"):
        right = line.rstrip().rindex("│") - 1
        inner = " " + line[1 : right + 1]
    spans = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", inner)]
    return spans, right


def continuations(lines: list[str]) -> list[bool]:
    """Whether each line continues a table cell of the line above: in a panel, a line of one text
    span that starts right of the panel's first column (its rows start there)."""
    flags, panel = [False] * len(lines), []
    for i, line in enumerate([*lines, "╰"]):
        if line.startswith("│"):
            panel.append(i)
            continue
        if panel:
            first = min(cells(lines[j])[0][0][0] for j in panel if cells(lines[j])[0])
            for j in panel:
                spans = cells(lines[j])[0]
                flags[j] = len(spans) == 1 and spans[0][0] > first
        panel = []
    return flags


def ragged_breaks(text: str, width: int) -> list[str]:
    """Pairs of lines where a paragraph (or a table cell) breaks before a word that fitted."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines()]
    continued = continuations(lines)
    found = []
    for i, (a, b) in enumerate(zip(lines, lines[1:], strict=False)):
        (a_spans, right), (b_spans, _) = cells(a), cells(b)
        if not a_spans or not b_spans or a.startswith(("╭", "╰")) or b.startswith(("╭", "╰")):
            continue
        panel = b.startswith("│")
        if panel and not continued[i + 1]:
            continue  # b starts a new row of its table
        start, _, rest = b_spans[0]
        above = [k for k, (s, _, _) in enumerate(a_spans) if s == start]
        if not above or rest.startswith(TYPER_NOTES):
            continue  # not the same paragraph or cell, or typer's note set as one unit
        k = above[0]
        right = right if panel else width - 1
        if k + 1 < len(a_spans):  # a column to the right: the cell ends before its gap
            right = a_spans[k + 1][0] - 2
        if a_spans[k][1] + 1 + len(rest.split(" ")[0]) <= right - SLACK:
            found.append(f"{a.rstrip()}\n{b.rstrip()}")
    return found


def test_the_detector_finds_the_ragged_breaks_of_the_old_help():
    """A paragraph hand-wrapped at 100 columns, and a first line hand-wrapped in the commands
    list, where "display" ended up alone; rich's own break before "display" is not counted."""
    found = ragged_breaks(RAGGED, 100)
    assert len(found) == 2, found
    assert found[0].startswith(" Writes OUT/calibration.h5") and "simulated bench" in found[0]
    top, below = found[1].splitlines()
    assert top.rstrip(" │").endswith("  display") and "response, geometry" in below
    assert ragged_breaks(RAGGED.replace("display  ", "display response, geometry"), 100) != []


@pytest.mark.parametrize("width", [80, 100, 137])
def test_no_help_text_breaks_mid_sentence(monkeypatch, capsys, width):
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    paths = list(command_paths())
    assert len(paths) >= 15  # the root, 11 commands and groups, and the groups' commands
    for path in paths:
        code, out, err = run_hil(monkeypatch, capsys, *path, "--help")
        assert code == 0, err
        assert max(len(line) for line in out.splitlines()) == width
        assert ragged_breaks(out, width) == [], f"hil {' '.join(path)} --help"


def test_help_lists_the_commands_in_the_order_a_lab_uses_them(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run_hil(monkeypatch, capsys, "--help")
    assert code == 0
    panel = out[out.index("─ Commands ") :].splitlines()[1:]
    names = [m.group(1) for line in panel if (m := re.match(r"│ (\S+) ", line))]
    assert names == LAB_ORDER


def test_the_command_line_starts_without_loading_torch():
    """Every command imports its heavy modules when it runs, so `hil --help` answers at once."""
    heavy = "('torch', 'cv2', 'h5py')"
    probe = f"import sys, hil.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"
