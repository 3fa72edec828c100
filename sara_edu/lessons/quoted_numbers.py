"""Does every number the prose quotes come from a run? A checker for the notebooks' markdown.

A sentence that names the QUICK setting quotes what the QUICK run printed. The checker takes the numbers such
a sentence quotes from it (decimals, percentages, ratios and counts: ``0.1%``, ``1.02×``, ``0.93``, ``41``) and
looks each one up in a pool of numbers from the sources: the executed notebook's outputs and its code cells (the
settings). A quote matches a source number when that number, rounded as the quote is written, equals it (a
source fraction also matches as a percentage: 0.112 reads as "0.1%" only if written as a percentage, 0.62 as
"62%"). :func:`unsupported` returns the quotes no source holds: a sentence the run contradicts, or a number
typed by hand.

Within a sentence, the part that names another source ("the full setting", "the study", "the benchmark") up to
the next mention of QUICK quotes that source, not the QUICK run, and is not checked against it; the parts that
name the full setting are checked the same way against the committed record of a full-setting run
(``make handouts`` writes ``notebooks/records/<name>.full.json``). Times (``0.18 s``, ``5 min``) and sentences
about running times (``Running time``) are left out: a shared machine's load changes them from run to run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

#: A number as prose writes it: 1,658,403 / 0.93 / 62% / 1.02× (the unit decides how it is matched).
_NUMBER = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?(?:e-?\d+)?)(\s?%|×)?(?![\w.]\d)")
#: What is not prose: LaTeX, links' targets, HTML tags (inline code: see :func:`_code`).
_NOT_PROSE = re.compile(r"\$[^$]*\$|\]\([^)]*\)|<[^>]+>")
_CODE = re.compile(r"`[^`]*`")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*(])")
#: The sources a sentence can name; the part after one such name quotes that source (until the next name).
SOURCES = {"QUICK": r"QUICK", "full setting": r"full setting|full-setting",
           "study": r"the study|study's|controls study", "benchmark": r"benchmark"}
#: Quantities no rerun reproduces: times (a shared machine's load changes them).
_TIMING = re.compile(r"^\s?(?:s|ms|min|minutes|seconds)\b")


@dataclass(frozen=True)
class Quote:
    text: str       # as written, e.g. "1.8%"
    value: float    # 1.8
    decimals: int   # 1
    percent: bool
    sentence: str

    def matches(self, number: float) -> bool:
        candidates = (number, 100 * number) if self.percent else (number,)
        return any(round(c, self.decimals) == round(self.value, self.decimals) for c in candidates)


def _code(match) -> str:
    """Inline code quotes no number; a path into the committed records still says where the numbers come from."""
    code = match.group(0)
    return " the benchmark " if "benchmarks/" in code else " the study " if "reports/" in code else " "


def sentences(markdown: str) -> list[str]:
    """The markdown's sentences, whitespace collapsed, code, formulas and link targets removed."""
    out = []
    for paragraph in re.split(r"\n\s*\n|\n(?=#)", _NOT_PROSE.sub(" ", _CODE.sub(_code, markdown))):
        text = re.sub(r"\s+", " ", paragraph)
        out += [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    return out


def part_about(sentence: str, about: str = "QUICK") -> str:
    """The parts of ``sentence`` that describe the ``about`` source (a key of :data:`SOURCES`): from each mention
    of it to the next mention of another source (or the sentence's end)."""
    others = "|".join(v for k, v in SOURCES.items() if k != about)
    cuts = sorted([(m.start(), "about") for m in re.finditer(SOURCES[about], sentence)] +
                  [(m.start(), "other") for m in re.finditer(others, sentence, re.I)])
    kept, state, start = [], "other", 0
    for position, kind in cuts + [(len(sentence), "end")]:
        if state == "about":
            kept.append(sentence[start:position])
        if kind != "end":
            state, start = kind, position
    return " … ".join(kept)


def quotes(sentence: str, integers: bool = False) -> list[Quote]:
    """The checked numbers of one sentence: decimals, percentages and ratios (and whole numbers if ``integers``)."""
    found = []
    sentence = re.sub(r"(\d+(?:\.\d+)?)\s?[-–](\s?\d+(?:\.\d+)?)\s?%", r"\1% - \2%", sentence)  # 86-93%: both are %
    for m in _NUMBER.finditer(sentence):
        raw, unit = m.group(1), (m.group(2) or "").strip()
        if "e" in raw or not ("." in raw or unit or integers) or _TIMING.match(sentence[m.end():]):
            continue
        digits = raw.replace(",", "")
        # as precise as written: 0.93 to 2 decimals; a whole number to its last non-zero digit (1,500: hundreds)
        decimals = len(digits.split(".")[1]) if "." in digits else -(len(digits) - len(digits.rstrip("0")))
        if digits.strip("0") == "":
            decimals = 0
        found.append(Quote(m.group(0).strip(), float(digits), decimals, unit == "%", sentence))
    return found


def number_pool(texts) -> list[float]:
    """Every number in ``texts`` (outputs, code, records), as floats; thousands separators allowed."""
    pool = []
    for text in texts:
        for raw in re.findall(r"-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?", text):
            try:
                pool.append(abs(float(raw.replace(",", ""))))
            except ValueError:
                continue
    return pool


def notebook_texts(nb) -> tuple[str, list[str]]:
    """(markdown, sources) of an executed notebook (an nbformat node or its JSON dict)."""
    cells = nb["cells"]
    markdown = "\n\n".join(_text(c["source"]) for c in cells if c["cell_type"] == "markdown")
    sources = []
    for c in cells:
        if c["cell_type"] != "code":
            continue
        sources.append(_text(c["source"]))
        for o in c.get("outputs", []):
            sources.append(_text(o.get("text", "")))
            for mime in ("text/plain", "text/html", "text/markdown"):
                value = o.get("data", {}).get(mime)
                if value:
                    sources.append(re.sub(r"<[^>]+>", " ", _text(value)))
    return markdown, sources


def _text(value) -> str:
    """A notebook field as one string (JSON notebooks store it as a list of lines)."""
    return value if isinstance(value, str) else "".join(value)


def unsupported(markdown: str, sources, *, about: str = "QUICK") -> list[Quote]:
    """The numbers that the sentences naming ``about`` quote from that run and no number in ``sources`` matches
    (whole numbers included: in such a sentence they are counts the run printed or settings the code sets)."""
    pool = number_pool(sources)
    missing = []
    for sentence in sentences(markdown):
        if not re.search(SOURCES[about], sentence) or "Running time" in sentence:
            continue
        missing += [q for q in quotes(part_about(sentence, about), integers=True)
                    if not any(q.matches(x) for x in pool)]
    return missing
