"""Converted ChatGLM-6B / 2 / 3 tokenizers against what each checkpoint's own code computed (golden.json).

Ids with and without special tokens, decoding, chat-template prompt ids (through the tokenizer's own
apply_chat_template and through llm.chat_format.render), generation stop ids, and the answer
post-processing of each original chat(), whole and on deltas. Also: SentencePiece itself on many texts,
a checkpoint with another normaliser and vocabulary (trained here), and ChatGLM-6B's image-token offset.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from pathlib import Path

import pytest

from llm.answer_text import (
    CHATGLM2_ANSWER,
    CHATGLM3_ANSWER,
    CHATGLM_6B_ANSWER,
    AnswerStream,
    answer_kind,
    process_answer,
)
from llm.chat_format import ChatTurn, render
from llm.convert.tokenizer import convert_tokenizer, write_generation_config
from llm.families import CHATGLM2, CHATGLM3, CHATGLM_6B, family_of
from tests.conftest import CHATGLM_FAMILIES, golden, original_checkpoint

FAMILY = {"chatglm-6b": CHATGLM_6B, "chatglm2-6b": CHATGLM2, "chatglm3-6b": CHATGLM3}


def _convert(name: str, out: Path) -> Path:
    source = original_checkpoint(name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    convert_tokenizer(source, FAMILY[name], out)
    write_generation_config(source, FAMILY[name], config, out)
    return out


@pytest.fixture(scope="module", params=CHATGLM_FAMILIES)
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    name = request.param
    out = _convert(name, tmp_path_factory.mktemp(name))
    return name, out, AutoTokenizer.from_pretrained(out), golden(name)


def _messages(case: dict) -> list[dict[str, str]]:
    messages = []
    for user, assistant in case["history"]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": case["query"]}]


def test_ids_with_and_without_special_tokens(converted) -> None:
    _, _, tokenizer, gold = converted
    for case in gold["tokenize"]:
        assert tokenizer(case["text"]).input_ids == case["ids"], case["text"]
        assert tokenizer(case["text"], add_special_tokens=False).input_ids == case["ids_no_special"], case["text"]


def test_decode(converted) -> None:
    _, _, tokenizer, gold = converted
    for case in gold["decode"]:
        assert tokenizer.decode(case["ids"]) == case["text"]


def test_chat_prompt_ids_template_and_render(converted) -> None:
    _, _, tokenizer, gold = converted
    assert any(case["history"] for case in gold["chat"]) and any(not case["history"] for case in gold["chat"])
    for case in gold["chat"]:
        by_template = tokenizer.apply_chat_template(_messages(case), add_generation_prompt=True)["input_ids"]
        assert by_template == case["prompt_ids"], case["query"]
        turns = [ChatTurn(user, assistant) for user, assistant in case["history"]]
        assert render(tokenizer, turns, case["query"]) == case["prompt_ids"], case["query"]


def test_generation_config_stop_and_pad_ids(converted) -> None:
    from transformers import GenerationConfig

    name, out, tokenizer, gold = converted
    config = json.loads((original_checkpoint(name) / "config.json").read_text(encoding="utf-8"))
    generation = GenerationConfig.from_pretrained(out)
    stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    for case in gold["chat"]:
        assert stops == (case["chat_stop_ids"] or [config["eos_token_id"]])
    assert generation.pad_token_id == config["pad_token_id"] == tokenizer.pad_token_id
    assert tokenizer.eos_token_id == stops[0]


def _output_ids(name: str, case: dict) -> list[int]:
    # ChatGLM3's chat() drops the last generated id (its stop token) before decoding.
    return case["chat_output_ids"][:-1] if name == "chatglm3-6b" else case["chat_output_ids"]


def test_answer_post_processing_matches_chat(converted) -> None:
    name, _, tokenizer, gold = converted
    kind = answer_kind(tokenizer)
    assert kind == {"chatglm-6b": CHATGLM_6B_ANSWER, "chatglm2-6b": CHATGLM2_ANSWER,
                    "chatglm3-6b": CHATGLM3_ANSWER}[name]
    rng = random.Random(0)
    for case in gold["chat"]:
        raw = tokenizer.decode(_output_ids(name, case))
        assert process_answer(kind, raw) == case["chat_answer"]
        stream, out, start = AnswerStream(kind), "", 0
        while start < len(raw):  # the same text in random deltas
            size = rng.randint(1, 6)
            out += stream.push(raw[start:start + size])
            start += size
        assert out + stream.finish() == case["chat_answer"]


def test_engine_decoder_streams_the_processed_answer(converted) -> None:
    from service.engine.detokenize import IncrementalDecoder

    name, _, tokenizer, gold = converted
    for case in gold["chat"]:
        ids = _output_ids(name, case)
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
        whole = process_answer(answer_kind(tokenizer), tokenizer.decode(ids, skip_special_tokens=True))
        assert "".join(pieces) == decoder.text == whole


@pytest.mark.parametrize("name", CHATGLM_FAMILIES)
def test_conversion_is_fast(name: str, tmp_path: Path) -> None:
    start = time.perf_counter()
    _convert(name, tmp_path)
    assert time.perf_counter() - start < 5.0


# ----- the rules of each chat() on constructed answers -----

def test_chatglm6b_rules_hold_back_only_what_they_need() -> None:
    stream = AnswerStream(CHATGLM_6B_ANSWER)
    assert stream.push("  \n") == ""  # leading whitespace: stripped
    assert stream.push("你好,") == "你好，"  # the left neighbour decides at once
    assert stream.push("ok,") == "ok"  # a mark with an unknown right neighbour waits
    assert stream.push("中") == "，中" and stream.push("x:") == "x"
    assert stream.push("ab [[训") == ":ab "  # a possible "[[训练时间]]" waits
    assert stream.push("练时间]]!") == "2023年！"
    assert stream.push("  ") == "" and stream.finish() == ""  # trailing whitespace: stripped
    assert process_answer(CHATGLM_6B_ANSWER, "a,b  ?中 [[训练] ") == "a,b  ？中 [[训练]"


def test_chatglm2_and_3_rules() -> None:
    for kind in (CHATGLM2_ANSWER, CHATGLM3_ANSWER):
        assert process_answer(kind, "\n 好,的 [[训练时间]]\n") == "好,的 2023年"
        stream = AnswerStream(kind)
        assert stream.push("\n") == "" and stream.push("x [[") == "x " and stream.push("a") == "[[a"
    with pytest.raises(ValueError):
        AnswerStream("unknown")


# ----- beyond the goldens: SentencePiece itself, another checkpoint, the image-token offset -----

def _spec_encode(name: str, processor, text: str) -> list[int]:
    """What each tokenization_chatglm.py computes for text without special tokens (re-stated here)."""
    if name != "chatglm-6b":
        return processor.encode(text)
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for length in range(80, 1, -1):
        text = text.replace(" " * length, f"<|blank_{length}|>")
    return processor.encode(text)


def test_matches_sentencepiece_on_dialogue_text(converted, shared_data: Path) -> None:
    import sentencepiece

    name, _, tokenizer, _ = converted
    model = "ice_text.model" if name == "chatglm-6b" else "tokenizer.model"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(original_checkpoint(name) / model))
    rng = random.Random(1)
    texts = []
    with (shared_data / "dialogues" / "cmd_im.jsonl").open(encoding="utf-8") as handle:
        for line, _ in zip(handle, range(300), strict=False):
            record = json.loads(line)
            texts += [record["question"], record["answer"]]
    texts = [t if rng.random() < 0.5 else t.replace("，", rng.choice(["\n", "\t", "  ", " \n  ", "\n\n"]))
             for t in texts] + ["x" + " " * 85 + "y", "a\n", " ", "。。", "😀\u3000 full-width　space"]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False).input_ids == _spec_encode(name, processor, text), text
        ids = _spec_encode(name, processor, text)
        expected = processor.decode(ids)
        if name == "chatglm-6b":
            expected = expected.replace("<n>", "\n").replace("<|tab|>", "\t")
            for length in range(2, 81):
                expected = expected.replace(f"<|blank_{length}|>", " " * length)
        assert tokenizer.decode(ids) == expected, text


def _train_sentencepiece(texts: list[str]) -> bytes:
    """A checkpoint unlike the fixtures: identity normaliser, no whitespace removal (as ChatGLM3-6B ships)."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=2500, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        character_coverage=0.98, split_digits=True, minloglevel=2)
    return buffer.getvalue()


def test_another_chatglm3_checkpoint(tmp_path: Path) -> None:
    import sentencepiece
    from transformers import AutoTokenizer

    from llm.tiny_model import iter_jsonl_text, local_corpus_files

    texts = [t for t in iter_jsonl_text(local_corpus_files()) if len(t) > 4][:3000]
    if len(texts) < 200:
        pytest.skip("not enough local text to train a SentencePiece model")
    model = _train_sentencepiece(texts)
    (tmp_path / "tokenizer.model").write_bytes(model)
    convert_tokenizer(tmp_path, CHATGLM3, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    n = processor.get_piece_size()
    ids = {"[gMASK]": n + 1, "sop": n + 3, "user": n + 6, "assistant": n + 7}
    rng = random.Random(2)
    for text in [*texts[-300:], "a\n\n b", "  x", "y  ", "\n", "", "tab\there 😀"]:
        assert tokenizer(text, add_special_tokens=False).input_ids == processor.encode(text), text
    for _ in range(100):
        turns = [ChatTurn(rng.choice(texts)[:60], rng.choice([*texts, ""])[:60]) for _ in range(rng.randint(0, 2))]
        message = rng.choice([*texts, " leading space", "\nnewline first"])[:60]
        expected = [ids["[gMASK]"], ids["sop"]]  # build_chat_input: role + encode("\n") + encode(content)
        for turn in turns:
            expected += [ids["user"], *processor.encode("\n"), *processor.encode(turn.user),
                         ids["assistant"], *processor.encode("\n"), *processor.encode(turn.assistant)]
        expected += [ids["user"], *processor.encode("\n"), *processor.encode(message), ids["assistant"]]
        assert render(tokenizer, turns, message) == expected


def test_chatglm6b_image_token_offset(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    source = original_checkpoint("chatglm-6b")
    shutil.copy(source / "ice_text.model", tmp_path / "ice_text.model")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "num_image_tokens": 7}))
    convert_tokenizer(tmp_path, CHATGLM_6B, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    gold = golden("chatglm-6b")
    for case in gold["tokenize"]:
        assert tokenizer(case["text"]).input_ids == [i + 7 for i in case["ids"]]
    for case in gold["decode"]:
        assert tokenizer.decode([i + 7 for i in case["ids"]] + [3]) == case["text"]  # ids below 7: no text


def test_chatglm3_told_from_chatglm2_by_its_tokenizer(tmp_path: Path) -> None:
    for name, other_name, expected in (("chatglm3-6b", "hospital/finetuned", CHATGLM3),
                                       ("chatglm2-6b", "THUDM/chatglm3-6b", CHATGLM2)):
        folder = tmp_path / name
        shutil.copytree(original_checkpoint(name), folder, ignore=shutil.ignore_patterns("*.bin", "lora", "ptuning"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": other_name}))
        assert family_of(folder) is expected


def test_fully_converted_directory(tmp_path: Path) -> None:
    """python -m training convert's output carries this tokenizer (H1's framework calls these functions)."""
    from transformers import AutoTokenizer

    from llm.convert import convert

    gold = golden("chatglm3-6b")
    out = tmp_path / "converted"
    convert(original_checkpoint("chatglm3-6b"), out, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert render(tokenizer, [], gold["chat"][0]["query"]) == gold["chat"][0]["prompt_ids"]
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == gold["chat"][0]["chat_stop_ids"]
    assert answer_kind(tokenizer) == CHATGLM3_ANSWER


def test_engine_streams_the_golden_greedy_answer_of_a_converted_chatglm3(tmp_path: Path) -> None:
    """Template → prompt ids → batched engine → post-processed deltas, on python -m training convert's output."""
    import asyncio

    from llm.convert import convert
    from llm.loading import load_model
    from service.engine.local import LocalEngine
    from service.engine.types import GenerationRequest, SamplingParams, TokenDelta

    case = golden("chatglm3-6b")["chat"][1]
    out = tmp_path / "converted"
    convert(original_checkpoint("chatglm3-6b"), out, progress=False)
    loaded = load_model(out, dtype="fp32", device="cpu")
    engine = LocalEngine(loaded, max_batch_size=2)
    engine.start()
    request = GenerationRequest(message=case["query"], history=[ChatTurn(*pair) for pair in case["history"]],
                                params=SamplingParams(max_new_tokens=len(case["greedy_12_ids"]), temperature=0))

    async def answer() -> tuple[str, object]:
        text, last = "", None
        async for event in engine.stream(request):
            if isinstance(event, TokenDelta):
                text += event.text
            last = event
        return text, last

    try:
        text, finished = asyncio.run(answer())
    finally:
        engine.stop()
    assert finished.prompt_tokens == len(case["prompt_ids"])
    tokenizer = loaded.tokenizer
    expected = process_answer(answer_kind(tokenizer), tokenizer.decode(case["greedy_12_ids"], skip_special_tokens=True))
    assert text == expected and text


@pytest.mark.parametrize("tokenizer_text", [b"IQ== 0\nIg== 1\nIw== 2\n", b""])
def test_a_tokenizer_model_that_is_not_sentencepiece_fails_the_conversion_before_the_weights(
        tokenizer_text: bytes, tmp_path: Path) -> None:
    from llm.convert import ConversionError, convert

    source = tmp_path / "source"
    shutil.copytree(original_checkpoint("chatglm3-6b"), source, ignore=shutil.ignore_patterns("lora", "ptuning"))
    (source / "tokenizer.model").write_bytes(tokenizer_text)  # a tiktoken rank file (GLM-4), or an empty one
    # A weight file it would stumble on: the tokenizer must be looked at first.
    (source / "pytorch_model-00002-of-00002.bin").write_bytes(b"truncated")
    with pytest.raises(ConversionError, match="is not a SentencePiece model"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
