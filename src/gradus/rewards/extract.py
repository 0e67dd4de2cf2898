"""Pull the final answer out of a model's completion.

Order of preference (the first rule that finds something wins):
1. the content of the LAST ``\\boxed{...}`` (braces may nest: ``\\boxed{\\frac{1}{2}}``);
2. the text after the last "answer is" (case-insensitive), up to the end of its line, without a
   trailing full stop;
3. the last number in the text (``-12``, ``3.5``, ``1,000``, ``3/4``).
Returns None when none of them matches.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = "\\boxed"
# Groups: 1 a box opens; 2 a brace pair with no brace inside (it opens no box, closes nothing outside:
# skipped); 3 a run of "{". No group: a run of "}".
_BRACES = re.compile(r"(\\boxed\{)|(\{[^{}]*\})|(\{+)|\}+")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
# A number: optional sign, digits with optional thousands commas, optional decimals, optional "/denominator".
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None (also when unclosed).

    One pass over the text, so linear in its length whatever it holds (``\\boxed{`` repeated 100,000
    times, or a million nested braces): a stack holds the open braces (a ``\\boxed{`` as where its content
    starts, a run of other ``{`` as one entry); each ``}`` closes the innermost open brace, and the closed
    box that starts last wins. A ``{`` closes at the first ``}`` that balances it, whatever came before it,
    so this is the box found by scanning forward from each ``\\boxed{``.
    """
    first = text.find(_BOXED + "{")
    if first == -1:  # most texts: a C-speed search, no scan
        return None
    # Braces before the first box cannot change where a box closes: the scan starts there.
    stack: list[int] = []  # a \boxed{'s content start (>= 0), or -k for a run of k other open braces
    start = end = -1  # content of the last-starting closed box
    for match in _BRACES.finditer(text, first):
        kind = match.lastindex
        if kind == 1:
            stack.append(match.end())
        elif kind == 3:
            stack.append(match.start() - match.end())
        elif kind == 2:
            continue
        else:  # a run of "}", closing the innermost open braces one by one
            pos, stop = match.start(), match.end()
            while pos < stop and stack:
                top = stack.pop()
                if top >= 0:
                    if top > start:
                        start, end = top, pos
                    pos += 1
                else:
                    used = min(stop - pos, -top)
                    pos += used
                    if used < -top:
                        stack.append(top + used)
    return text[start:end].strip() if start != -1 else None


def answer_is(text: str) -> str | None:
    """Text after the last "answer is", to the end of that line, without a trailing '.'; or None."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    tail = matches[-1].group(1).splitlines()[0].strip()
    tail = tail.rstrip(".").strip().strip("$").strip()
    return tail or None


def last_number(text: str) -> str | None:
    """The last number written in the text, e.g. '1,000' or '-3/4'; or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str) -> str | None:
    """Final answer by the rules in the module docstring."""
    for rule in (last_boxed, answer_is, last_number):
        found = rule(text)
        if found:
            return found
    return None


def parse_number(text: str) -> Fraction | None:
    """Exact value of a plain number ('3', '-0', '2.50', '1,000', '3/4', '.5'); None for anything else."""
    s = text.strip()
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    s = s.replace(",", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
