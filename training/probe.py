"""Collapse probe: fixed general and medical prompts, generated greedily every N steps and scored.

DoctorGLM collapsed after 50K iterations (general questions turned into garbage) and had no stopping rule.
The probe watches exactly that: degeneration of the generated text (distinct-n, repeated n-grams, empty
answers) and the loss on reference answers to general questions, which rises when a model forgets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .data import Example

GENERAL = [
    Example("你好，请介绍一下你自己。", "你好，我是一个医疗问答助手，可以回答常见的健康问题，但不能代替医生面诊。"),
    Example("请用一句话解释什么是人工智能。", "人工智能是让计算机模拟人类的学习、推理和判断等能力的技术。"),
    Example("周末天气很好，有什么适合的户外活动？", "可以去公园散步、骑自行车或者爬山，注意防晒和补充水分。"),
    Example("怎样才能睡得更好？", "保持规律的作息，睡前少看手机，避免喝咖啡和浓茶，卧室保持安静和适宜的温度。"),
]
MEDICAL = [
    Example("我最近总是头痛，晚上也睡不好，怎么办？",
            "头痛伴失眠常见于紧张性头痛或睡眠不足，建议规律作息、放松情绪，"
            "如果头痛加重或伴有呕吐、肢体无力，请及时到神经内科就诊。"),
    Example("孩子发烧38.5度，咳嗽，需要去医院吗？",
            "体温38.5度可以先物理降温并按说明服用退烧药，多喝水；"
            "如果持续高热超过三天、精神差或呼吸急促，请及时到儿科就诊。"),
    Example("胃疼，吃完饭以后更明显，是胃炎吗？",
            "饭后胃痛加重可能与胃炎或消化不良有关，建议清淡饮食、少食多餐，必要时做胃镜检查明确诊断。"),
    Example("高血压患者平时饮食要注意什么？",
            "高血压患者应低盐低脂饮食，多吃蔬菜水果，戒烟限酒，规律监测血压并按医嘱服药。"),
]


@dataclass
class ProbeScores:
    step: int
    distinct_1: float
    distinct_2: float
    repeat_4gram: float  # share of 4-gram occurrences that repeat an earlier one in the same answer
    empty_rate: float
    general_loss: float  # mean loss on the general reference answers
    medical_loss: float
    degenerate: bool = False
    collapsed: bool = False
    samples: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ngrams(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique character n-grams / all n-grams, per answer, averaged (characters: tokenizer-independent)."""
    values = []
    for text in texts:
        grams = _ngrams(text, n)
        if grams:
            values.append(len(set(grams)) / len(grams))
    return sum(values) / len(values) if values else 0.0


def repeated_ngram_rate(texts: list[str], n: int = 4) -> float:
    values = []
    for text in texts:
        grams = _ngrams(text, n)
        if grams:
            counts = Counter(grams)
            values.append(sum(c - 1 for c in counts.values()) / len(grams))
    return sum(values) / len(values) if values else 0.0


def empty_rate(texts: list[str], min_chars: int = 2) -> float:
    return sum(1 for t in texts if len(t.strip()) < min_chars) / len(texts) if texts else 0.0


def is_degenerate(texts: list[str], max_repeat: float = 0.5, min_distinct_2: float = 0.35,
                  max_empty: float = 0.5) -> bool:
    """Text a reader would call garbage: loops, a few n-grams over and over, or nothing at all."""
    return (repeated_ngram_rate(texts) > max_repeat or distinct_n(texts, 2) < min_distinct_2
            or empty_rate(texts) > max_empty)


def generate_answers(model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers (no repetition penalty: the probe must see loops the service's guard would hide)."""
    import torch

    from llm.chat_format import render
    from llm.prompt import compose_message

    device = next(model.parameters()).device
    answers = []
    for question in questions:
        ids = torch.tensor([render(tokenizer, [], compose_message(question))], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def reference_loss(model: Any, tokenizer: Any, examples: list[Example], max_len: int = 512) -> float:
    """Mean per-token loss on reference answers (prompt masked), one example at a time (no padding effects)."""
    import torch

    from .features import collate, encode

    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for ex in examples:
            batch = {k: v.to(device) for k, v in collate([encode(tokenizer, ex, max_len, 200)],
                                                         tokenizer.pad_token_id).items()}
            losses.append(float(model(**batch).loss))
    return sum(losses) / len(losses)


@dataclass
class CollapseWatch:
    """Stateful rule: degenerate now although healthy at the start, or general loss `delta` nats above its
    best so far, for `patience` probes in a row. A model that was garbage from the start (random init: varied
    but meaningless text, general loss near ln(vocab)) is not 'collapsing'; it only counts once it was healthy."""

    delta: float = 1.0
    patience: int = 1
    healthy_below: float = float("inf")  # general loss a model must beat to count as healthy (< ln(vocab) - 1)
    best_general: float = float("inf")
    was_healthy: bool = False
    strikes: int = 0

    def update(self, scores: ProbeScores) -> bool:
        forgot = scores.general_loss > self.best_general + self.delta
        bad = (scores.degenerate and self.was_healthy) or forgot
        self.best_general = min(self.best_general, scores.general_loss)
        self.was_healthy = self.was_healthy or (not scores.degenerate and scores.general_loss < self.healthy_below)
        self.strikes = self.strikes + 1 if bad else 0
        scores.collapsed = self.strikes >= self.patience
        return scores.collapsed


def run_probe(model: Any, tokenizer: Any, step: int, max_new_tokens: int = 48) -> ProbeScores:
    was_training = model.training
    model.eval()
    prompts = GENERAL + MEDICAL
    answers = generate_answers(model, tokenizer, [e.question for e in prompts], max_new_tokens)
    scores = ProbeScores(
        step=step,
        distinct_1=distinct_n(answers, 1),
        distinct_2=distinct_n(answers, 2),
        repeat_4gram=repeated_ngram_rate(answers),
        empty_rate=empty_rate(answers),
        general_loss=reference_loss(model, tokenizer, GENERAL),
        medical_loss=reference_loss(model, tokenizer, MEDICAL),
        degenerate=is_degenerate(answers),
        samples={e.question: a for e, a in zip(prompts, answers, strict=True)},
    )
    model.train(was_training)
    return scores
