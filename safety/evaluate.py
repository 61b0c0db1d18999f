"""Evaluation of the triage rules on a labelled JSONL set.

Each line: {"text": str, "history": [str] (optional), "emergency": bool, "rule": str | null,
"lang": "zh" | "en", "tag": str (optional, e.g. negated / remote / lookalike)}. An emergency's rule id may be null
in a set written without reading the rules (it then counts for recall, not for per-rule recall).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safety.triage import Triage

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True, slots=True)
class EvalSet:
    """A labelled set and whether the rules have been tuned on it.

    A set is "blind" until someone changes the rules after reading its misses; from then on it is
    "tuned" and its score says little about unseen complaints. ``note`` keeps the set's first
    blind score, the honest estimate it gave at the time.
    """

    path: Path
    kind: str  # "tuned" (trained or tuned on) | "seen" (decisions made on it, never trained on) | "blind"
    note: str = ""


EVAL_SETS = (
    EvalSet(DATA_DIR / "triage_eval.jsonl", "tuned", "development set the rules were written against"),
    EvalSet(DATA_DIR / "triage_holdout.jsonl", "tuned", "blind once, then tuned on its misses"),
    EvalSet(
        DATA_DIR / "triage_probe3.jsonl",
        "tuned",
        "first run blind (rules 2025.06-1): recall 81.4%, false alarms 0.0%; then used to broaden rules",
    ),
    EvalSet(
        DATA_DIR / "triage_probe4.jsonl",
        "tuned",
        "first run blind (rules 2025.06-2): recall 58.1%, false alarms 6.2%; then used to broaden rules",
    ),
    EvalSet(
        DATA_DIR / "triage_train_extra.jsonl",
        "tuned",
        "backstop training set (bs2): emergencies in many indirect wordings and benign look-alikes of each condition",
    ),
    EvalSet(
        DATA_DIR / "triage_train_benign.jsonl",
        "tuned",
        "backstop training set (bs3): 80 common benign outpatient complaints (short texts, rashes, chills with a mild "
        "fever, sweating after exercise...); bs2 flagged 10 of them",
    ),
    EvalSet(
        DATA_DIR / "triage_train_adult.jsonl",
        "tuned",
        "backstop training set (bs4): 192 ordinary adult complaints told at length (joints, skin, ENT, eyes, gut, "
        "women's and men's health, check-up results, past events) and 48 adult emergencies told at length; bs3 "
        "flagged 22 of 108 ordinary adult complaints in the retrieval probes",
    ),
    EvalSet(
        DATA_DIR / "triage_train_child.jsonl",
        "tuned",
        "backstop training set (bs6): 110 everyday paediatric complaints (fever with a cough for a few days, teething, "
        "rashes, milestones...) and 40 paediatric emergencies; bs5 read a child's mention as evidence of an emergency "
        "(孩子发烧三天，咳嗽有痰 -> call 120)",
    ),
    EvalSet(
        DATA_DIR / "triage_train_adult2.jsonl",
        "tuned",
        "backstop training set (bs6): 140 ordinary adult complaints that sound a little alarming (wheeze an inhaler "
        "relieves, heartburn behind the breastbone, palpitations after coffee...) and 30 adult emergencies in indirect "
        "words; added with triage_train_child so 110 easy paediatric negatives do not lower the threshold onto adults",
    ),
    EvalSet(
        DATA_DIR / "triage_probe5.jsonl",
        "blind",
        "written after rules 2025.06-3; never tuned on, but its miss families informed triage_train_extra",
    ),
    EvalSet(
        DATA_DIR / "triage_probe6.jsonl",
        "blind",
        "written before the learned backstop existed; never tuned on, but its miss families informed "
        "triage_train_extra",
    ),
    EvalSet(
        DATA_DIR / "triage_probe7.jsonl",
        "blind",
        "written before triage_train_extra and backstop bs2; first run (rules 2025.06-3 + backstop bs1): "
        "rules only 75.0% / 0.0%, rules+backstop recall 89.3%, false alarms 5.9%; never tuned on",
    ),
    EvalSet(
        DATA_DIR / "triage_benign_blind.jsonl",
        "blind",
        "60 common benign complaints written before backstop bs3; first run: rules 0/60, rules+backstop bs2 4/60 "
        "false alarms (6.7%); never tuned on",
    ),
    EvalSet(
        DATA_DIR / "triage_probe8.jsonl",
        "blind",
        "40 emergencies (all 17 rule families, PE after a flight, ectopic pregnancy, button battery, charcoal "
        "burning, DKA...) and 22 look-alikes (past events, mild versions); written after rules 2025.06-5 and "
        "backstop bs3; first run: rules only 92.5% / 0%, rules+backstop 100% / 0%; never tuned on",
    ),
    EvalSet(
        DATA_DIR / "triage_adult_probe.jsonl",
        "seen",
        "the retrieval team's 116 adult complaints (knowledge/data/probes, 14 debatable urgent ones left out), "
        "labelled for emergency by clinical reading; bs3: 87.5% / 20.4% (22/108). Never trained on, but used to "
        "decide: bs4's adult training set was written after reading its false alarms, its missed acute glaucoma "
        "led to the rules 2025.06-6 glaucoma alternative, and dropping function-character unigrams was kept "
        "because it lowered its false alarms (11.1% -> 7.4%)",
    ),
    EvalSet(
        DATA_DIR / "triage_probe9.jsonl",
        "blind",
        "26 ordinary adult complaints told at length and 10 emergencies, written after bs4; first run: rules only "
        "90.0% / 0%, rules+backstop 100% / 0% (with and without the function-character change); never tuned on",
    ),
    EvalSet(
        DATA_DIR / "triage_probe10_short.jsonl",
        "blind",
        "79 short benign chief complaints (1-6 characters, lay and clinical words, none of issue 17's eleven) and "
        "33 short emergencies, written before the backstop's minimum-evidence rule; first run (rules 2025.06-8, "
        "bs4): rules only 93.9% / 0%, rules+backstop 100% / 7.6% (6/79); never tuned on",
    ),
    EvalSet(
        DATA_DIR / "triage_probe11.jsonl",
        "seen",
        "90 everyday complaints (45 by parents about a child, 45 adults') and 40 emergencies (20 children's, 20 "
        "adults'), written 2026-12-01 before bs6; first run (rules 2025.06-9, bs5): rules only 85.0% / 0%, "
        "rules+backstop 97.5% / 2.2% (2/90); then its errors were read and bs6's training sets have near-twins of "
        "them (and of ~10 of its complaints): no longer blind",
    ),
    EvalSet(
        DATA_DIR / "triage_train_adult3.jsonl",
        "tuned",
        "47 everyday look-alikes (chest-wall pain after exercise that hurts when pressed, toothache with a swollen "
        "cheek, one vomit keeping fluids down, someone's past suicidal thoughts now treated, acne) and 12 "
        "emergencies of the same families, written for bs7 after reading probe 13's false alarms (not copied)",
    ),
    EvalSet(
        DATA_DIR / "triage_probe12.jsonl",
        "seen",
        "73 non-emergencies (adults', children's, look-alikes: past, hypothetical, negated; 2 repeats of other "
        "sets dropped) and 55 emergencies in everyday words (35 adults', 20 children's), 20 in English, written by "
        "a helper who saw neither the rules nor any other set (rule ids left null); first run (rules 2025.06-10, "
        "bs6): rules only 74.5% / 2.7%, rules+backstop 94.5% / 4.1% (3/73); its misses (carbon monoxide from a coal "
        "stove, a drain cleaner swallowed, an English overdose with a note) and a news look-alike led to rules "
        "2025.06-11: no longer blind",
    ),
    EvalSet(
        DATA_DIR / "triage_probe13.jsonl",
        "seen",
        "the same make as probe 12 by another helper (more relatives and bystanders writing, older patients, "
        "pregnancy, teenagers, typos): 73 non-emergencies (2 repeats dropped), 55 emergencies, 20 in English, written "
        "2026-12-01 before rules 2025.06-11; first run (rules 2025.06-11, bs6): rules only 85.5% / 1.3%, "
        "rules+backstop 96.4% / 8.2% (6/73); its errors were read: two missed wordings (a rash that a glass does not "
        "fade, a child's 抽筋 that does not stop) and an acne false alarm led to rules 2025.06-12, its false alarms "
        "to the families of triage_train_adult3 (bs7): no longer blind",
    ),
    EvalSet(
        DATA_DIR / "triage_probe14.jsonl",
        "seen",
        "the same make as probes 12 and 13 by a third helper (more over-triage bait: muscular chest twinges, "
        "palpitations after coffee, a usual migraine, a playing child with 39 degrees; emergencies told calmly): "
        "124 after 6 repeats of other sets were dropped, written 2026-12-01 before rules 2025.06-12 and bs7; "
        "first run (rules 2025.06-12, bs7): rules only 78.2% / 2.9%, rules+backstop 94.5% / 4.3% (3/69); its three "
        "misses (an English plan with a rope, magnetic beads swallowed, a child drowsy and coughing after breathing "
        "in bath water) led to rules 2025.06-13: no longer blind",
    ),
    EvalSet(
        DATA_DIR / "triage_probe15.jsonl",
        "blind",
        "the same make by a fourth helper, with less common emergency families (sepsis in the elderly, a rigid "
        "belly, DKA, sudden loss of vision in one eye, tearing back pain, a fish bone with drooling, heat stroke, a "
        "dog bite to a child's face, a head knock on blood thinners) and non-emergencies sharing their words; "
        "123 after 7 repeats of other sets were dropped (55 emergencies), written 2026-12-01 before rules "
        "2025.06-13; first run (rules 2025.06-13, bs7): rules only 80.0% / 1.5%, rules+backstop 100% / 1.5% (1/68); "
        "the same with 2025.06-14 (narrowed after a review, not on this set); never tuned on",
    ),
    EvalSet(
        DATA_DIR / "triage_probe16.jsonl",
        "seen",
        "the same make by a fifth helper (heat stroke, near-drowning, electric shock, reduced fetal movement, a "
        "child's liquor, look-alikes sharing their words): 121 after 4 near-repeats of other sets were dropped (53 "
        "emergencies, 10 in English), written 2026-12-01 after rules 2025.06-14; first run (rules 2025.06-14, bs7): "
        "rules only 79.2% / 4.4%, rules+backstop 100% / 5.9% (4/68); its false alarms were read (chest-muscle "
        "soreness with '喘气没问题', a question about a carbon-monoxide alarm, CPR seen on television, sleepiness "
        "after staying up) and kept as over-triage: every narrow fix tried silenced emergencies (docs/safety.md)",
    ),
)
# Tuned sets first (eval, holdout), as before; then the probes.
DEFAULT_SETS = tuple(s.path for s in EVAL_SETS)


@dataclass(frozen=True, slots=True)
class Case:
    text: str
    history: tuple[str, ...]
    emergency: bool
    rule: str | None
    lang: str
    tag: str = ""


@dataclass
class Report:
    name: str
    n: int = 0
    positives: int = 0
    negatives: int = 0
    true_pos: int = 0
    false_pos: int = 0
    rule_total: Counter[str] = field(default_factory=Counter)
    rule_hit: Counter[str] = field(default_factory=Counter)
    misses: list[Case] = field(default_factory=list)
    false_alarms: list[tuple[Case, list[str]]] = field(default_factory=list)
    wrong_rule: list[tuple[Case, list[str]]] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.true_pos / self.positives if self.positives else 1.0

    @property
    def false_alarm_rate(self) -> float:
        return self.false_pos / self.negatives if self.negatives else 0.0


def load_cases(path: Path) -> list[Case]:
    cases: list[Case] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            case = Case(
                text=str(rec["text"]),
                history=tuple(str(h) for h in rec.get("history") or ()),
                emergency=bool(rec["emergency"]),
                rule=rec.get("rule"),
                lang=str(rec.get("lang", "")),
                tag=str(rec.get("tag", "")),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: bad evaluation record: {exc}") from exc
        if not case.emergency and case.rule is not None:
            raise ValueError(f"{path}:{lineno}: a non-emergency has no rule id")
        cases.append(case)
    return cases


def evaluate(triage: Triage, cases: Iterable[Case], name: str = "") -> Report:
    report = Report(name=name)
    for case in cases:
        report.n += 1
        a = triage.assess(case.text, case.history)
        flagged = a.level == "emergency"
        if case.emergency:
            report.positives += 1
            if case.rule is not None:
                report.rule_total[case.rule] += 1
            if flagged:
                report.true_pos += 1
                if case.rule in a.rule_ids:
                    report.rule_hit[case.rule] += 1
                elif case.rule is not None:
                    report.wrong_rule.append((case, a.rule_ids))
            else:
                report.misses.append(case)
        else:
            report.negatives += 1
            if flagged:
                report.false_pos += 1
                report.false_alarms.append((case, a.rule_ids))
    return report


def format_report(report: Report, rule_order: Sequence[str]) -> str:
    lines = [
        f"== {report.name}: {report.n} complaints ({report.positives} emergencies, {report.negatives} not)",
        f"recall            {report.recall:6.1%}  ({report.true_pos}/{report.positives})",
        f"false-alarm rate  {report.false_alarm_rate:6.1%}  ({report.false_pos}/{report.negatives})",
        "per-rule recall (expected rule fired):",
    ]
    for rid in [*rule_order, *sorted(set(report.rule_total) - set(rule_order))]:
        total = report.rule_total.get(rid, 0)
        if total:
            hit = report.rule_hit.get(rid, 0)
            lines.append(f"  {rid:<24} {hit / total:6.1%}  ({hit}/{total})")
        else:
            lines.append(f"  {rid:<24}    n/a  (no cases)")
    if report.misses:
        lines.append("misses (emergency not flagged):")
        for c in report.misses:
            lines.append(f"  [{c.rule or '?'}] {c.text}" + (f"  history={list(c.history)}" if c.history else ""))
    if report.wrong_rule:
        lines.append("flagged under another rule:")
        lines += [f"  [{c.rule} -> {','.join(r)}] {c.text}" for c, r in report.wrong_rule]
    if report.false_alarms:
        lines.append("false alarms:")
        lines += [f"  [{','.join(r)}] {c.text}" for c, r in report.false_alarms]
    return "\n".join(lines)
