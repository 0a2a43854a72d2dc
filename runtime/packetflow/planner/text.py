"""The words of intents and contracts: tokens, stems, stopwords, a few synonyms, constants.

Pure functions: the built-in planner's retrieval and search, and the plan cache, compare
texts through :func:`terms`, so "summarise", "summary" and "summarized" meet.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from packetflow.actors.bm25 import tokenize

# Function words and the filler of requests ("please give me ..."): they tell nothing about
# which capability is meant.
_STOPWORD_TEXT = """
a about above after again all also am an and any are as at be because been before being
below between both but by can could did do does doing done each few for from further get
gets give given had has have having he her here hers him his how i if in into is it its
itself just let me more most my myself no nor not now of off on once only or other our
ours out over own please same she should so some such than that the their theirs them
then there these they this those through to too under until up very want was we were
what when where which while who whom why will with would you your yours using use need
tell show thing something every many much one ones make made
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

# Words that name the same operation (a small, generic thesaurus of tool vocabulary; each
# group maps to its first word). Not a list of the evaluation's phrasings: these are the
# usual ways of asking for the operations a toolbox has.
SYNONYM_GROUPS = (
    "remove drop delete strip discard eliminate",
    "duplicate repeated repeat duplicated dupe",
    "item entry element",
    "find extract pull locate collect gather",
    "count tally",
    "summarize summary condense shorten digest abstract",
    "largest biggest maximum max highest greatest",
    "smallest lowest minimum min least",
    "average mean",
    "total sum",
    "convert change transform turn",
    "fetch download retrieve grab load",
    "page webpage site website",
    "text string content",
    "language tongue",
    "uppercase upper capital capitals",
    "lowercase lower small",
    "check validate verify",
    "hash digest checksum",
    "parse read",
    "sentiment opinion mood",
    "positive good",
    "negative bad",
    "keyword keywords topic",
    "search lookup query",
    "send mail deliver",
    "reverse backwards invert",
    "split separate break",
    "sort order arrange rank",
    "descending decreasing",
    "ascending increasing",
    "analyse analyze analysis inspect",
)
_WORD_RE = re.compile(r"[^\W_]+", re.UNICODE)
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
_QUOTED_RE = re.compile(r"\"([^\"]{1,200})\"|'([^']{1,200})'")
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL_RE = re.compile(r"https?://[^\s<>\"']+")
# Where an intent moves on to another request: "summarise it, then translate the summary".
_CLAUSE_RE = re.compile(r"[,;:]|\b(?:and|then|after|afterwards|finally|also)\b", re.IGNORECASE)
_BRITISH = (("isation", "ization"), ("ised", "ized"), ("ising", "izing"), ("ise", "ize"),
            ("yse", "yze"), ("ysed", "yzed"))
_SUFFIXES = ("izations", "ization", "ations", "ation", "izing", "ized", "izes", "ize",
             "ings", "ing", "ied", "ies", "ed", "es", "s", "y", "e")


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """A crude English stem: British spelling folded, common suffixes off (3+ letters stay)."""
    word = word.lower()
    for british, american in _BRITISH:
        if word.endswith(british):
            word = word[: -len(british)] + american
            break
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not (
                suffix == "s" and word.endswith("ss")):
            return word[: -len(suffix)]
    return word


def _synonyms() -> dict[str, str]:
    table: dict[str, str] = {}
    for group in SYNONYM_GROUPS:
        words = group.split()
        for word in words:
            table.setdefault(stem(word), stem(words[0]))
    return table


SYNONYMS = _synonyms()


def split_identifier(name: str) -> str:
    """``top_words`` / ``text-stats`` / ``fromCurrency`` -> words separated by spaces."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return re.sub(r"[-_.]+", " ", spaced)


def terms(text: str) -> list[str]:
    """Content terms of ``text`` in order: tokens, stopwords out, stemmed, synonyms folded."""
    found = []
    for token in tokenize(split_identifier(text)):
        if token in STOPWORDS or token.isdigit():
            continue
        stemmed = stem(token)
        found.append(SYNONYMS.get(stemmed, stemmed))
    return found


@dataclass(frozen=True)
class Constant:
    """A value the intent itself gives (a number, a quoted string, an address) and where."""

    value: str | int | float
    kind: str  # number | quoted | email | url
    position: int  # index of the word it stands at


@dataclass(frozen=True)
class IntentAnalysis:
    """What the planner reads from an intent: its terms in order, and the values it names."""

    text: str
    terms: tuple[str, ...]
    words: tuple[str, ...]  # every word, lower-cased, in order (for windows around values)
    constants: tuple[Constant, ...] = field(default=())
    clauses: tuple[int, ...] = field(default=())  # the clause of each term

    @property
    def clause_count(self) -> int:
        """How many clauses have a term: how many requests the intent makes, at most."""
        return len(set(self.clauses))

    def positions(self, term: str) -> list[int]:
        """Where ``term`` occurs among ``terms``."""
        return [index for index, found in enumerate(self.terms) if found == term]


def analyse(text: str) -> IntentAnalysis:
    """Terms, words and constants of an intent."""
    constants: list[Constant] = []
    for pattern, kind in ((_EMAIL_RE, "email"), (_URL_RE, "url")):
        for match in pattern.finditer(text):
            constants.append(Constant(match.group(0), kind, _word_index(text, match.start())))
    stripped = _URL_RE.sub(" ", _EMAIL_RE.sub(" ", text))
    words = tuple(w.lower() for w in _WORD_RE.findall(stripped))
    for match in _QUOTED_RE.finditer(stripped):
        constants.append(Constant(match.group(1) or match.group(2), "quoted",
                                  _word_index(stripped, match.start())))
    for match in _NUMBER_RE.finditer(stripped):
        number = match.group(0)
        value: int | float = float(number) if "." in number else int(number)
        constants.append(Constant(value, "number", _word_index(stripped, match.start())))
    found: list[str] = []
    clauses: list[int] = []
    for index, part in enumerate(_CLAUSE_RE.split(stripped)):
        part_terms = terms(part)
        found.extend(part_terms)
        clauses.extend([index] * len(part_terms))
    return IntentAnalysis(text, tuple(found), words, tuple(constants), tuple(clauses))


def _word_index(text: str, offset: int) -> int:
    return len(_WORD_RE.findall(text[:offset]))
