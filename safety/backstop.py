"""Learned backstop behind the red-flag rules: a small linear model over n-gram features.

The rules are precise but brittle: a complaint worded in a way nobody wrote a synonym for is missed.
The backstop scores every request the rules did not flag with a logistic-regression model trained
(``python -m safety train-backstop``) on the TUNED labelled sets only; when its probability reaches
the threshold chosen by cross-validation, the request is flagged as an emergency with the rule id
``"backstop"`` and the general emergency advice of the rule file.

Features (per patient turn, then the union over the turns of a request):

- Chinese: character 1-3-grams of every CJK run; English: word unigrams and bigrams, plus the
  first five letters of longer words (``wheezing`` / ``wheezy`` share ``p:wheez``);
- negation-aware: an n-gram whose first character lies in a negation scope of the rule machinery
  (the same cues, window and scope breaks; concept mentions the rules negate) gets a ``~`` prefix,
  so 没有胸痛 yields ``~胸痛``, not ``胸痛``;
- the rule concepts' final state over the turns: ``c:chest_pain`` (affirmed), ``c~chest_pain`` (negated);
- ``t:chronic`` when a turn tells a long or recurring course (疼了三个月, 好几年了, 反复, 每次): emergencies
  are told in minutes and hours, so the time course is evidence the n-grams alone spread thin.

Scoring is a dictionary lookup per feature: binary features, L2-normalised over the features the
model knows, ``p = sigmoid(bias + sum(w) / sqrt(n))``. The weights file is plain JSON (format 1).

Minimum evidence: with a handful of features the normalisation lets one weight decide (头晕 alone is
``c:hemodynamic`` and two characters), so the backstop scored one-word chief complaints at random.
``min_evidence`` (chosen by training: the fewest content words of any emergency the backstop alone
found out of fold on the tuned sets) is the least evidence at which Triage consults it; below it only
an explicit severity/onset cue lets it judge. Content words (:func:`evidence_units`): CJK characters
other than grammatical ones, and English words other than function words. (Counting English words
twice, as a symptom takes two characters and one or two words, was tried: out-of-fold false alarms
on the tuned sets 4.0% against 3.7% at the same recall, so each counts once.)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BACKSTOP_PATH = Path(__file__).resolve().parent / "data" / "triage_backstop.json"
BACKSTOP_RULE_ID = "backstop"
# Whether Triage.from_file() loads the packaged backstop when its argument does not say (the
# service passes its settings, DOCTORGLM_TRIAGE_BACKSTOP / _PATH, explicitly; nothing here reads the
# environment). Blind sets: recall 72% -> 98% at <= 6% false alarms (docs/safety.md).
BACKSTOP_ENABLED_BY_DEFAULT = True
FORMAT = 1

_CJK_RUN = re.compile(r"[\u3400-\u9fff]+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_PHRASE = re.compile(r"[^,;!?:\n。.、()\[\]\"]+")
# Grammatical characters say nothing alone (都, 了, 的); as unigrams they only let a long complaint's
# length tip the score. They stay inside 2- and 3-grams.
_FUNCTION_CHARS = frozenset("的了都是在有我也就还很吗呢吧啊呀着过把被给让和与及或而但又再才那这个得地之")
# English function words carry no evidence of their own ("i", "my", "the"), like 的/了 above.
_EN_FUNCTION_WORDS = frozenset(
    (
        "a", "an", "the", "and", "or", "but", "of", "to", "in", "on", "at", "for", "with", "from", "by", "is",
        "are", "am", "was", "were", "be", "been", "being", "i", "me", "my", "mine", "you", "your", "he", "him",
        "his", "she", "her", "it", "its", "we", "our", "they", "them", "their", "this", "that", "these", "those",
        "do", "does", "did", "have", "has", "had", "so", "as", "if", "than", "then", "there", "here",
    )
)
_CONTENT_CJK = re.compile(r"[\u3400-\u9fff]")
_CHRONIC = re.compile(
    r"(?:好几|几|多|\d+|[一二两三四五六七八九十半]+)\s*(?:年|个多月|个月|多月|周|星期|礼拜)(?:了|以来|来|多了)"
    r"|[了有](?:好几|几|\d+|[一二两三四五六七八九十半]+)\s*(?:年|个多月|个月|多月|周|星期|礼拜)"
    r"|反复|经常|每次|每年|每到|长期|多年|好几年|这几年|老是|常常|一直都"
    r"|for (?:weeks|months|years)|(?:weeks|months|years) now|on and off|every time|keeps coming back"
)


@dataclass(frozen=True, slots=True)
class Mention:
    """One concept term found in a turn; ``affirmed`` is False when it is negated."""

    start: int
    end: int
    concept: str
    affirmed: bool


class TurnScan:
    """One scanned patient turn: its concept mentions, plus what the backstop needs to build its
    features lazily (only requests the rules do not flag pay for them; cached with the scan)."""

    __slots__ = ("mentions", "s", "masked", "_features")

    def __init__(self, mentions: tuple[Mention, ...], s: str, masked: str) -> None:
        self.mentions = mentions
        self.s = s  # the normalised turn
        self.masked = masked  # the same with concept terms masked
        self._features: frozenset[str] | None = None

    def features(self, negation_scope: Callable[[str, str, tuple[Mention, ...]], bytearray]) -> frozenset[str]:
        if self._features is None:
            self._features = turn_features(self.s, negation_scope(self.s, self.masked, self.mentions))
        return self._features


def turn_features(s: str, negated: bytearray | bytes) -> frozenset[str]:
    """n-gram features of one normalised turn; ``negated[i]`` marks characters in a negation scope."""
    out: set[str] = set()
    for run in _CJK_RUN.finditer(s):
        a, b = run.span()
        for i in range(a, b):
            neg = "~" if negated[i] else ""
            for n in (1, 2, 3):
                if i + n <= b and not (n == 1 and s[i] in _FUNCTION_CHARS):
                    out.add(neg + s[i : i + n])
    for phrase in _PHRASE.finditer(s):
        prev = ""
        for w in _WORD.finditer(s, phrase.start(), phrase.end()):
            word = w.group()
            if word.isdigit():
                word = "<num>"
            neg = "~" if negated[w.start()] else ""
            out.add(neg + "w:" + word)
            if len(word) > 5:
                out.add(neg + "p:" + word[:5])
            if prev:
                out.add(neg + "b:" + prev + "_" + word)
            prev = word
    return frozenset(out)


def evidence_units(turns: Sequence[TurnScan]) -> int:
    """Content words over the turns: CJK characters other than grammatical ones, other English words."""
    n = 0
    for t in turns:
        n += sum(1 for ch in _CONTENT_CJK.findall(t.s) if ch not in _FUNCTION_CHARS)
        n += sum(1 for w in _WORD.findall(t.s) if w not in _EN_FUNCTION_WORDS)
    return n


def request_features(
    turns: Sequence[TurnScan],
    state: Mapping[str, bool],
    negation_scope: Callable[[str, str, tuple[Mention, ...]], bytearray],
) -> frozenset[str]:
    feats: set[str] = set()
    for t in turns:
        feats |= t.features(negation_scope)
    feats.update(("c:" if affirmed else "c~") + name for name, affirmed in state.items())
    if any(_CHRONIC.search(t.s) for t in turns):
        feats.add("t:chronic")
    return frozenset(feats)


@dataclass(frozen=True)
class Backstop:
    version: str
    threshold: float
    bias: float
    weights: Mapping[str, float]
    source: str = ""
    min_evidence: int = 0  # fewer content words (and no severity cue): the backstop is not consulted

    def probability(self, features: Iterable[str]) -> float:
        w = self.weights
        total, n = 0.0, 0
        for f in features:
            v = w.get(f)
            if v is not None:
                total += v
                n += 1
        z = self.bias + (total / math.sqrt(n) if n else 0.0)
        return 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0

    def to_json(self, meta: Mapping[str, object] | None = None) -> str:
        data = {
            "format": FORMAT,
            "version": self.version,
            "threshold": self.threshold,
            "min_evidence": self.min_evidence,
            "bias": self.bias,
            "meta": dict(meta or {}),
            "weights": dict(sorted(self.weights.items())),
        }
        return json.dumps(data, ensure_ascii=False, indent=1, sort_keys=False) + "\n"


def backstop_setting(value: Path | str | bool | None) -> Path | None:
    """Resolve the backstop argument to a weights file, or None for rules only.

    True = the packaged weights, False = rules only, a path = that weights file, None = the default
    (``BACKSTOP_ENABLED_BY_DEFAULT``). A string is always a path: on/off is a bool, typed by the caller.
    """
    if value is None:
        value = BACKSTOP_ENABLED_BY_DEFAULT
    if value is True:
        return DEFAULT_BACKSTOP_PATH
    if value is False:
        return None
    return Path(value)


def load_backstop(path: Path | str) -> Backstop:
    """Load a weights file; ValueError naming the file for anything malformed."""
    path = Path(path)

    def fail(msg: str) -> ValueError:
        return ValueError(f"backstop weights file {path}: {msg}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise fail(f"cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise fail("top level must be a JSON object")
    if data.get("format") != FORMAT:
        raise fail(f'"format" must be {FORMAT}')
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise fail('"version" must be a non-empty string')
    threshold, bias = data.get("threshold"), data.get("bias")
    if not _is_number(threshold) or not 0.0 < threshold <= 1.0:
        raise fail('"threshold" must be a number in (0, 1]')
    if not _is_number(bias):
        raise fail('"bias" must be a finite number')
    min_evidence = data.get("min_evidence", 0)
    if not isinstance(min_evidence, int) or isinstance(min_evidence, bool) or not 0 <= min_evidence <= 1000:
        raise fail('"min_evidence" must be an integer between 0 and 1000')
    weights = data.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise fail('"weights" must be a non-empty object of feature -> number')
    for k, v in weights.items():
        if not k or not _is_number(v):
            raise fail(f"weight {k!r} must be a finite number")
    return Backstop(
        version=version,
        threshold=float(threshold),
        bias=float(bias),
        weights=weights,
        source=str(path),
        min_evidence=min_evidence,
    )


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
