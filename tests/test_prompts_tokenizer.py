"""Prompt strings and token ids as the released LISA checkpoints saw them (legacy sentencepiece)."""

from __future__ import annotations

import json

import pytest

from lisa_agent.engine.prompts import IMAGE_TOKEN_INDEX, build_prompt
from lisa_agent.engine.tokenization import LisaTokenizer

LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the human's questions. USER: <im_start><image><im_end>\n"
            "What is the knife in this image? ASSISTANT:")


def test_llava_v1_prompt_is_byte_exact():
    assert build_prompt("llava_v1", "What is the knife in this image?") == LLAVA_V1


def test_llava_v1_closed_turn_and_history():
    closed = build_prompt("llava_v1", "q", answer="Sure, [SEG].")
    assert closed.endswith("USER: <im_start><image><im_end>\nq ASSISTANT: Sure, [SEG].</s>")
    two = build_prompt("llava_v1", "q2", history=[("q1", "a1")])
    assert two.endswith("USER: <im_start><image><im_end>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:")


def test_llava_llama_2_prompt_is_byte_exact():
    text = build_prompt("llava_llama_2", "Where is the mug?")
    assert text == ("[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand "
                    "the visual content that the user provides, and assist the user with a variety of tasks using "
                    "natural language.\n<</SYS>>\n\n<im_start><image><im_end>\nWhere is the mug? [/INST]")


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    """A sentencepiece model (like LLaMA's: BPE, byte fallback, dummy prefix) + LISA-7B added tokens."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    words = ("knife mug bottle apple banana ball book key pen hammer spoon scissors table red green blue yellow "
             "black white small large left right grab something cut hold coffee drive nail eat write open "
             "please output segmentation mask image object the a an is it what where which this that").split()
    lines = [LLAVA_V1.replace("<im_start><image><im_end>\n", ""), "Sure, it is the mug. Sure, the knife.",
             "What is the knife in this image? Please output segmentation mask.", "It is the red mug, sure."] * 50
    lines += [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + "." for i in range(400)]
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False)
    n = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).GetPieceSize()
    added = {"<im_patch>": n, "<im_start>": n + 1, "<im_end>": n + 2, "[SEG]": n + 3}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "unk_token": "<unk>"}))
    return folder, added


def test_legacy_tokenization_quirks(sp_folder):
    folder, added = sp_folder
    tok = LisaTokenizer.from_pretrained(folder)
    assert tok.kind == "sentencepiece"
    ids = tok.encode_prompt(LLAVA_V1)
    pieces = [tok.id_to_token(i) for i in ids]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # only the first BOS kept
    start = ids.index(added["<im_start>"])
    assert ids[start + 1] == IMAGE_TOKEN_INDEX and ids[start + 2] == added["<im_end>"]
    assert pieces[start - 1] != "▁" and pieces[start - 1].endswith(":")  # no "▁" inserted before <im_start>
    assert pieces[start + 3] == "▁What"  # the "\n" after <im_end> vanished; the chunk gets the dummy prefix
    assert "<0x0A>" not in pieces


def test_answer_tokenizes_as_published(sp_folder):
    folder, added = sp_folder
    tok = LisaTokenizer.from_pretrained(folder)
    pieces = [tok.id_to_token(i) for i in tok.encode("Sure, [SEG].", add_bos=False)]
    assert pieces == ["▁Sure", ",", "[SEG]", "▁", "."]
    assert tok.decode(tok.encode("Sure, [SEG].")) == "Sure, [SEG] ."  # legacy decode joins parts with spaces


def test_seg_id_comes_from_the_added_tokens(sp_folder):
    """Tokenizing the string "[SEG]" with sentencepiece alone yields several pieces, a leading "▁" among
    them: the id must come from the added-token table (convert_tokens_to_ids), as LISA does."""
    import sentencepiece as spm

    folder, added = sp_folder
    tok = LisaTokenizer.from_pretrained(folder)
    raw = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).EncodeAsPieces("[SEG]")
    assert raw[0].startswith("▁") and len(raw) > 1
    assert tok.convert_tokens_to_ids("[SEG]") == added["[SEG]"]
    assert tok.encode("[SEG]", add_bos=False) == [added["[SEG]"]]


def test_fast_tokenizer_backend_matches_the_legacy_rules(tiny_segmenter):
    tok = tiny_segmenter.tokenizer
    assert tok.kind == "tokenizers"
    pieces = [tok.id_to_token(i) for i in tok.encode("Sure, [SEG].", add_bos=False)]
    k = pieces.index("[SEG]")
    assert "".join(pieces[:k]) == "▁Sure," and "".join(pieces[k + 1:]) == "▁."  # dummy prefix per chunk
    ids = tok.encode_prompt(build_prompt("llava_v1", "the red mug"))
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(tok.bos_token_id) == 1


def test_whitespace_is_kept_next_to_special_tokens(sp_folder):
    """transformers 4.31 strips around added tokens like [SEG], but not around <s>, </s>, <unk>."""
    folder, added = sp_folder
    tok = LisaTokenizer.from_pretrained(folder)
    assert tok.encode("Sure, [SEG] .", add_bos=False) == tok.encode("Sure,[SEG].", add_bos=False)
    assert tok.encode("it is </s>", add_bos=False) != tok.encode("it is</s>", add_bos=False)
    assert tok.encode("it is</s>", add_bos=False)[-1] == tok.eos_token_id
