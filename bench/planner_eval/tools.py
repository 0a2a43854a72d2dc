"""Python handlers of the planner evaluation's toolbox: small, deterministic, offline.

The "web" here is a fixed snapshot of a few pages (``PAGES``) and a search index over them,
so every capability really runs without a network.
"""

from __future__ import annotations

import base64 as b64
import csv as csvlib
import hashlib
import io
import re
from collections import Counter
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"https?://[^\s<>\"')]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_STOPWORD_TEXT = (
    "a an and are as at be by for from has have in is it its of on or that the this to was "
    "were will with")
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

# A tiny offline dictionary: enough for the evaluation's sentences, unknown words are kept.
DICTIONARY: dict[str, dict[str, str]] = {
    "fr": {"the": "le", "cat": "chat", "is": "est", "on": "sur", "mat": "tapis",
           "dog": "chien", "good": "bon", "morning": "matin", "hello": "bonjour",
           "world": "monde", "sleeps": "dort", "in": "dans", "garden": "jardin"},
    "de": {"the": "die", "cat": "katze", "is": "ist", "on": "auf", "mat": "matte",
           "dog": "hund", "good": "guten", "morning": "morgen", "hello": "hallo",
           "world": "welt", "sleeps": "schläft", "in": "im", "garden": "garten"},
    "es": {"the": "el", "cat": "gato", "is": "está", "on": "en", "mat": "tapete",
           "dog": "perro", "good": "buenos", "morning": "días", "hello": "hola",
           "world": "mundo", "sleeps": "duerme", "in": "en", "garden": "jardín"},
}
LANGUAGE_MARKERS = {
    "en": {"the", "is", "and", "of", "to", "in", "it"},
    "fr": {"le", "la", "est", "et", "les", "des", "sur", "un", "une"},
    "de": {"der", "die", "das", "ist", "und", "auf", "ein", "eine"},
    "es": {"el", "la", "es", "y", "los", "las", "en", "está"},
}
RATES_TO_USD = {"USD": 1.0, "EUR": 1.25, "GBP": 1.5}

PAGES: dict[str, str] = {
    "https://docs.example/kubernetes": (
        "<html><head><title>Kubernetes operators</title></head><body><h1>Operators</h1>"
        "<p>An operator watches resources and reconciles them.</p>"
        "<a href=\"https://docs.example/crds\">CRDs</a> "
        "<a href=\"https://docs.example/kopf\">kopf</a></body></html>"),
    "https://docs.example/crds": (
        "<html><head><title>Custom resources</title></head><body>"
        "<p>A custom resource extends the API.</p></body></html>"),
    "https://news.example/today": (
        "<html><head><title>Today</title></head><body><p>Nothing happened today. "
        "Really nothing.</p><a href=\"https://news.example/yesterday\">yesterday</a>"
        "</body></html>"),
}
SENT: list[dict[str, str]] = []


def words(text: str) -> list[str]:
    """The words of a text, as written."""
    return _WORD.findall(text)


def sentences_of(text: str) -> list[str]:
    """The sentences of a text, stripped."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def summarize(text: str, sentences: int) -> dict[str, Any]:
    """The first ``sentences`` sentences."""
    return {"summary": " ".join(sentences_of(text)[:sentences])}


def summarize_bullets(text: str) -> dict[str, Any]:
    """Each of the first three sentences as a bullet."""
    return {"bullets": [s.rstrip(".!?") for s in sentences_of(text)[:3]]}


def translate(text: str, target_language: str) -> dict[str, Any]:
    """Word by word through the dictionary, lower-cased; punctuation kept."""
    table = DICTIONARY[target_language]
    translated = _WORD.sub(lambda m: table.get(m.group(0).lower(), m.group(0).lower()), text)
    return {"translation": translated, "language": target_language}


def detect_language(text: str) -> dict[str, Any]:
    """The language whose marker words occur most often (English on a tie)."""
    found = Counter(w.lower() for w in words(text))
    scores = {lang: sum(found[m] for m in markers) for lang, markers in LANGUAGE_MARKERS.items()}
    return {"language": max(scores, key=lambda lang: (scores[lang], lang == "en"))}


def count_words(text: str) -> dict[str, Any]:
    """How many words."""
    return {"count": len(words(text))}


def count_characters(text: str) -> dict[str, Any]:
    """How many characters."""
    return {"characters": len(text)}


def uppercase(text: str) -> dict[str, Any]:
    """Upper case."""
    return {"text": text.upper()}


def lowercase(text: str) -> dict[str, Any]:
    """Lower case."""
    return {"text": text.lower()}


def title_case(text: str) -> dict[str, Any]:
    """Every word capitalised."""
    return {"text": text.title()}


def reverse(text: str) -> dict[str, Any]:
    """Characters in reverse order."""
    return {"text": text[::-1]}


def keywords(text: str, top: int) -> dict[str, Any]:
    """The ``top`` most frequent words of four letters or more outside the stopwords."""
    counts = Counter(w.lower() for w in words(text)
                     if len(w) >= 4 and w.lower() not in STOPWORDS)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {"keywords": [w for w, _ in ranked[:top]]}


def frequencies(text: str) -> dict[str, Any]:
    """Word -> occurrences (lower-cased)."""
    return {"frequencies": dict(Counter(w.lower() for w in words(text)))}


def extract_emails(text: str) -> dict[str, Any]:
    """Email addresses, in order."""
    return {"emails": _EMAIL.findall(text)}


def extract_urls(text: str) -> dict[str, Any]:
    """URLs, in order."""
    return {"urls": _URL.findall(text)}


def extract_numbers(text: str) -> dict[str, Any]:
    """Numbers, in order (integers stay integers)."""
    return {"numbers": [float(n) if "." in n else int(n) for n in _NUMBER.findall(text)]}


def redact_emails(text: str) -> dict[str, Any]:
    """Email addresses replaced by [redacted]."""
    return {"text": _EMAIL.sub("[redacted]", text)}


POSITIVE = {"good", "great", "love", "excellent", "happy", "nice", "wonderful", "best"}
NEGATIVE = {"bad", "awful", "hate", "terrible", "sad", "poor", "worst", "broken"}


def sentiment(text: str) -> dict[str, Any]:
    """positive/negative/neutral by counting opinion words."""
    found = [w.lower() for w in words(text)]
    score = sum(w in POSITIVE for w in found) - sum(w in NEGATIVE for w in found)
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return {"sentiment": label, "score": float(score)}


def slugify(title: str) -> dict[str, Any]:
    """lower-case words joined by hyphens."""
    return {"slug": "-".join(w.lower() for w in words(title))}


def split_sentences(text: str) -> dict[str, Any]:
    """The sentences."""
    return {"sentences": sentences_of(text)}


def join_lines(lines: list[str]) -> dict[str, Any]:
    """Lines joined with newlines."""
    return {"text": "\n".join(lines)}


def csv_to_records(csv: str) -> dict[str, Any]:
    """Rows as objects keyed by the header."""
    return {"records": list(csvlib.DictReader(io.StringIO(csv)))}


def records_to_csv(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A header of every key (first-seen order), then one line per record."""
    header: list[str] = []
    for record in records:
        header.extend(k for k in record if k not in header)
    out = io.StringIO()
    writer = csvlib.DictWriter(out, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return {"csv": out.getvalue()}


def sort_numbers(numbers: list[float], descending: bool) -> dict[str, Any]:
    """Sorted, ascending unless ``descending``."""
    return {"numbers": sorted(numbers, reverse=descending)}


def sort_records(records: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """Sorted by ``field`` (records without it last)."""
    return {"records": sorted(records, key=lambda r: (field not in r, str(r.get(field, ""))))}


def filter_records(records: list[dict[str, Any]], field: str, value: Any) -> dict[str, Any]:
    """The records whose ``field`` equals ``value``."""
    return {"records": [r for r in records if r.get(field) == value]}


def pluck(records: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """``field`` of every record that has it."""
    return {"values": [r[field] for r in records if field in r]}


def statistics(numbers: list[float]) -> dict[str, Any]:
    """min, max, mean and median."""
    ordered = sorted(numbers)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"min": ordered[0], "max": ordered[-1], "mean": sum(ordered) / len(ordered),
            "median": median}


def average(numbers: list[float]) -> dict[str, Any]:
    """The arithmetic mean."""
    return {"mean": sum(numbers) / len(numbers)}


def deduplicate(items: list[Any]) -> dict[str, Any]:
    """First occurrences, in order."""
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return {"items": seen}


def celsius_to_fahrenheit(celsius: float) -> dict[str, Any]:
    """°C -> °F."""
    return {"fahrenheit": celsius * 9 / 5 + 32}


def convert_currency(amount: float, from_currency: str, to_currency: str) -> dict[str, Any]:
    """At the fixed rates, rounded to cents."""
    converted = amount * RATES_TO_USD[from_currency] / RATES_TO_USD[to_currency]
    return {"amount": round(converted, 2), "currency": to_currency}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.links: list[str] = []
        self.text: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_title = tag == "title"
        if tag == "a":
            self.links.extend(v for k, v in attrs if k == "href" and v)

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif data.strip():
            self.text.append(data.strip())


def _page(html: str) -> _Page:
    parser = _Page()
    parser.feed(html)
    return parser


def fetch_page(url: str) -> dict[str, Any]:
    """The page from the offline snapshot (status 404 and empty HTML when absent)."""
    html = PAGES.get(url)
    return {"html": html or "", "status": 200 if html is not None else 404}


def html_to_text(html: str) -> dict[str, Any]:
    """The visible text, title excluded."""
    return {"text": " ".join(_page(html).text)}


def extract_title(html: str) -> dict[str, Any]:
    """The <title>."""
    return {"title": _page(html).title}


def extract_links(html: str) -> dict[str, Any]:
    """Every <a href>."""
    return {"links": _page(html).links}


def parse_url(url: str) -> dict[str, Any]:
    """scheme, host, path, query."""
    parts = urlsplit(url)
    return {"scheme": parts.scheme, "host": parts.hostname or "", "path": parts.path,
            "query": parts.query}


def web_search(query: str) -> dict[str, Any]:
    """Pages of the snapshot whose text shares a word with the query, best first."""
    terms = {w.lower() for w in words(query)}
    scored = []
    for url, html in PAGES.items():
        page = _page(html)
        found = {w.lower() for w in words(page.title + " " + " ".join(page.text))}
        if terms & found:
            scored.append((-len(terms & found), url, page.title))
    return {"results": [{"title": title, "url": url} for _, url, title in sorted(scored)]}


def send_email(to: str, subject: str, body: str) -> dict[str, Any]:
    """Appends to the outbox ``SENT`` (the effect the planner must not run unasked)."""
    SENT.append({"to": to, "subject": subject, "body": body})
    return {"sent": True, "id": f"msg-{len(SENT)}"}


def validate_email(email: str) -> dict[str, Any]:
    """Whether the whole string is one address."""
    return {"valid": _EMAIL.fullmatch(email) is not None}


def sha256(text: str) -> dict[str, Any]:
    """Hex SHA-256 of the UTF-8 text."""
    return {"sha256": hashlib.sha256(text.encode()).hexdigest()}


def base64_encode(text: str) -> dict[str, Any]:
    """Base64 of the UTF-8 text."""
    return {"base64": b64.b64encode(text.encode()).decode()}


def base64_decode(base64: str) -> dict[str, Any]:
    """The UTF-8 text of Base64."""
    return {"text": b64.b64decode(base64).decode()}
