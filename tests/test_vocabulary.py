import json
from collections import Counter

import pytest

from speechxfer.cli import main
from speechxfer.errors import InputError
from speechxfer.manifest import Utterance, write_manifest
from speechxfer.text import TextNormalizer, TextOptions, TextRejected
from speechxfer.vocabulary import (BLANK, UNK, WORD_DELIMITER, Vocabulary, character_counts, charset_audit,
                                   encode_texts, vocabulary_from_manifests)
from tests.tiny import make_tiny_checkpoint

TRAIN = ["merhaba dünya", "ışık ve gölge", "çay içelim"]


def test_from_texts_orders_special_tokens_then_characters():
    vocab = Vocabulary.from_texts(TRAIN)
    assert vocab.tokens[:3] == (BLANK, UNK, WORD_DELIMITER)
    assert (vocab.blank_id, vocab.unk_id, vocab.delimiter_id) == (0, 1, 2)
    chars = vocab.tokens[3:]
    assert list(chars) == sorted(chars) and " " not in chars
    assert set(chars) == set("".join(TRAIN).replace(" ", ""))
    assert len(vocab) == 3 + len(chars)
    with pytest.raises(ValueError, match="delimiter"):
        Vocabulary.from_texts(["a|b"])


def test_encode_and_decode_ctc():
    vocab = Vocabulary.from_texts(TRAIN)
    ids = vocab.encode("çay ve x")
    assert ids[3] == vocab.delimiter_id and ids[-1] == vocab.unk_id
    assert [vocab.tokens[i] for i in ids[:3]] == ["ç", "a", "y"]
    # A CTC path: repeats collapse, blanks separate real repeats and vanish, delimiters become single spaces.
    b, d = vocab.blank_id, vocab.delimiter_id
    el = vocab.encode("l")[0]
    path = [b, *vocab.encode("ç"), *vocab.encode("ç"), b, b, el, el, b, el, d, d, b, *vocab.encode("ışık"), d]
    assert vocab.decode_ctc(path) == "çll ışık"
    assert vocab.collapse_ctc(path) == [*vocab.encode("ç"), el, el, d, *vocab.encode("ışık"), d]
    # Label ids are not a CTC path: decode keeps repeated letters.
    assert vocab.decode(vocab.encode("ışık ll ve")) == "ışık ll ve"
    assert vocab.decode_ctc(vocab.encode("ışık ll ve")) == "ışık l ve"
    for decode in (vocab.decode, vocab.decode_ctc, vocab.collapse_ctc):
        with pytest.raises(ValueError, match="outside"):
            decode([len(vocab)])


def test_encode_all_gives_each_texts_ids_end_to_end_in_a_small_integer_type():
    vocab = Vocabulary.from_texts(TRAIN)
    # unknown characters below and above the table's last code point, and a lone surrogate (JSON can spell one)
    texts = ["çay ve x", "", "ışık\ud800 😀", "Ω"]
    ids = vocab.encode_all(texts)
    assert ids.tolist() == [i for text in texts for i in vocab.encode(text)]
    assert vocab.encode("x😀\ud800") == [vocab.unk_id] * 3 and vocab.encode("ç ç")[1] == vocab.delimiter_id
    assert ids.dtype.itemsize == 1 and vocab.encode_all([]).tolist() == []


def test_saved_vocabulary_loads_in_transformers(tmp_path):
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    vocab = Vocabulary.from_texts(TRAIN)
    vocab.save(tmp_path)
    assert {"vocab.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == len(vocab)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.word_delimiter_token_id) == (
        vocab.blank_id, vocab.unk_id, vocab.delimiter_id)
    for text in ["ışık ve gölge", "merhaba çay", "dünya"]:
        ids = tokenizer(text).input_ids
        assert ids == vocab.encode(text)
        assert tokenizer.decode(ids, group_tokens=False) == text
        path = [vocab.blank_id] + [i for t in ids for i in (t, t, vocab.blank_id)]
        assert tokenizer.decode(path) == vocab.decode_ctc(path) == text
    assert Vocabulary.load(tmp_path) == vocab

    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(tmp_path)
    processor = Wav2Vec2Processor.from_pretrained(tmp_path)
    assert processor.tokenizer("çay").input_ids == vocab.encode("çay")


def test_load_reads_other_checkpoints_vocabularies(tmp_path):
    tokens = ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "b"]
    make_tiny_checkpoint(tmp_path / "ctc", ctc_vocab=["[PAD]", "[UNK]", "|", "a", "é"])
    assert Vocabulary.load(tmp_path / "ctc").tokens == ("[PAD]", "[UNK]", "|", "a", "é")

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "<pad>", "unk_token": "<unk>", "word_delimiter_token": "|"}))
    vocab = Vocabulary.load(hf)
    assert (vocab.blank_id, vocab.unk_id, vocab.delimiter_id) == (0, 3, 4)

    mms = tmp_path / "mms"
    mms.mkdir()
    (mms / "vocab.json").write_text(json.dumps({"eng": {"<pad>": 0, "<unk>": 1, "|": 2, "a": 3},
                                                "tur": {"<pad>": 0, "<unk>": 1, "|": 2, "ı": 3}}))
    (mms / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>", "unk_token": "<unk>"}))
    assert Vocabulary.load(mms, target_lang="tur").tokens[3] == "ı"
    with pytest.raises(InputError, match="eng, tur"):
        Vocabulary.load(mms)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text('{"a": 0, "b": 2}')
    with pytest.raises(InputError, match="without gaps"):
        Vocabulary.load(broken)
    # saved in Latin-1: the line of the first byte that is not UTF-8, not the codec's own sentence
    (broken / "vocab.json").write_bytes('{"a": 0,\n "é": 1}'.encode("latin-1"))
    with pytest.raises(InputError) as caught:
        Vocabulary.load(broken)
    assert str(caught.value) == f"{broken / 'vocab.json'}:2: not UTF-8 (invalid continuation byte)"


def test_charset_audit_lists_unseen_characters_with_counts_and_examples():
    audit = charset_audit(character_counts(["abc ab", "ca"]), {
        "dev": [("d1", "abx"), ("d2", "xx é"), ("d3", "abc")],
        "test": [("t1", "ab"), ("t2", "ñ")],
    })
    assert audit.train_chars == {"a": 3, "b": 2, "c": 2}
    rows = [(u.split, u.char, u.count, u.utterances, u.example_ids) for u in audit.unseen]
    assert rows == [("dev", "x", 3, 2, ("d1", "d2")), ("dev", "é", 1, 1, ("d2",)), ("test", "ñ", 1, 1, ("t2",))]
    assert audit.unseen[1].name == "LATIN SMALL LETTER E WITH ACUTE"
    assert audit.coverage == {"dev": pytest.approx(5 / 9), "test": pytest.approx(2 / 3)}
    table = audit.format_table()
    assert "LATIN SMALL LETTER N WITH TILDE" in table and "d1, d2" in table
    assert json.loads(json.dumps(audit.to_dict()))["unseen"][0]["example_ids"] == ["d1", "d2"]
    # what training says of it (the model can never write these)
    assert audit.warnings() == [
        "dev: 2 characters that no train transcript holds, so the model cannot write them: 'x' (3), 'é' (1) (44.4% of "
        "dev's characters, in 2 utterances or more)",
        "test: 1 character that no train transcript holds, so the model cannot write them: 'ñ' (1) (33.3% of test's "
        "characters, in 1 utterance or more)"]
    assert charset_audit(character_counts(["ab"]), {"dev": [("d1", "ba")]}).warnings() == []


def _manifest(path, rows):
    write_manifest(path, [Utterance(id=i, audio_path=f"{i}.wav", text=t, duration_s=1.0) for i, t in rows])
    return path


def test_vocabulary_from_manifests_normalizes_and_reports_rejections(tmp_path):
    train = _manifest(tmp_path / "train.jsonl", [("a", "IŞIK, Gölge!"), ("b", "Su 3 kez"), ("c", "çay")])
    dev = _manifest(tmp_path / "dev.jsonl", [("d", "Işık ve Xenon")])
    normalizer = TextNormalizer(TextOptions(locale="tr", digits="reject"))
    vocab, audit, problems = vocabulary_from_manifests(train, normalizer=normalizer, others={"dev": dev})
    assert set(vocab.tokens[3:]) == set("ışıkgölgeçay".replace(" ", ""))
    assert [(p.kind, p.utterance_id) for p in problems] == [("rejected_text", "b")]
    assert {u.char for u in audit.unseen} == {"v", "x", "n", "o"}  # "ö" in train is not "o"


def test_vocab_command_writes_tokenizer_and_audit(tmp_path, capsys):
    from transformers import Wav2Vec2CTCTokenizer

    train = _manifest(tmp_path / "train.jsonl", [("a", "Ahoj světe"), ("b", "Dobrý den")])
    test = _manifest(tmp_path / "test.jsonl", [("t1", "Řeka"), ("t2", "Ďábel")])
    out = tmp_path / "vocab"
    assert main(["vocab", str(train), str(out), "--test", str(test)]) == 0
    printed = capsys.readouterr().out
    assert "LATIN SMALL LETTER R WITH CARON" in printed
    audit = json.loads((out / "charset_audit.json").read_text(encoding="utf-8"))
    assert {u["char"] for u in audit["unseen"]} == {"ř", "k", "ď", "á", "l"}
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("ahoj den").input_ids, group_tokens=False) == "ahoj den"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"\n', encoding="utf-8")
    assert main(["vocab", str(bad), str(tmp_path / "v2")]) == 2
    assert "no usable training text" in capsys.readouterr().err


def test_character_counts_are_those_of_each_character_over_blocks_of_texts():
    # more texts than one block holds, the later blocks without the highest code points of the first
    texts = ["😀é a"] * 70_000 + ["ab"] * 70_000 + ["", "c c"]
    assert character_counts(texts) == Counter(c for text in texts for c in text if c != " ")
    assert character_counts([]) == Counter()


def test_encoded_texts_count_and_label_what_normalizing_twice_gave():
    # What train() did before normalizing once: character_counts of the normalized texts (those not rejected),
    # then each text normalized again and encoded. Texts the normalizer rejects, lengthens (NFD) or empties, a
    # character the vocabulary lacks (unk), more blocks than one, more characters than an int8 id holds.
    normalizer = TextNormalizer(TextOptions(unicode_form="NFD", digits="reject"))
    texts = ["Héllo, wörld", "marque 1", " ... ", "", "ÇA VA", "x\ud800y"] * 12_000 + [
        "".join(map(chr, range(0x400, 0x4a0))), "end"]

    def normalized(text: str) -> str | None:
        try:
            return normalizer(text)
        except TextRejected:
            return None

    before = list(map(normalized, texts))
    given = Vocabulary.from_texts(["hello world"])  # a recipe's vocabulary.path: no ç, no Cyrillic
    for vocab in (None, given):
        encoded = encode_texts(texts, normalizer)
        assert len(encoded) == len(texts)
        assert encoded.rejected.tolist() == [text is None for text in before]
        assert encoded.character_counts == character_counts(text for text in before if text is not None)
        vocab = vocab or Vocabulary.from_texts(["".join(encoded.character_counts)])
        labels = encoded.take_labels(vocab)
        assert labels.dtype == vocab.encode_all([]).dtype
        for k in [*range(12), len(texts) - 2, len(texts) - 1]:
            assert labels[encoded.starts[k]:encoded.starts[k + 1]].tolist() == (
                [] if before[k] is None else vocab.encode(before[k])), k
        assert len(labels) == encoded.starts[-1] == sum(len(text or "") for text in before)
        with pytest.raises(RuntimeError, match="already taken"):
            encoded.take_labels(vocab)
    assert given.unk_id in labels[encoded.starts[4]:encoded.starts[5]].tolist()  # "ça va": ç is unk
    assert len(encode_texts([], normalizer)) == 0


def test_encode_all_of_ascii_texts_with_a_vocabulary_past_the_ascii_range():
    # ids of ASCII texts come from one byte a character (text.code_points): the table reaches past 255 here
    vocab = Vocabulary((BLANK, UNK, WORD_DELIMITER, *"abcdefghijklmnopqrstuvwxyz", *map(chr, range(0x100, 0x300))))
    assert vocab.encode("ab z{") == [3, 4, 2, 28, 1] and vocab.encode("\u0101a") == [30, 3]
    assert Vocabulary.from_texts(["ab"]).encode("ab\x7f") == [3, 4, 1]  # past the table: unk


def test_saving_into_a_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(InputError, match=r"taken: the output folder is a file$"):
        Vocabulary.from_texts(TRAIN).save(tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine"
