import gzip
import math
import shutil
import subprocess

import pytest
import torch

from speechxfer.decoding import (BeamSearchDecoder, BeamSearchOptions, GreedyDecoder, decode_batch,
                                 lexicon_from_arpa, read_lexicon)
from speechxfer.errors import InputError
from speechxfer.vocabulary import Vocabulary

VOCAB = Vocabulary(("[PAD]", "[UNK]", "|", "a", "c", "t", "u"))
FRAME_S = 0.02
# Two words are spelled alike but the LM strongly prefers "cat" after <s> and over "cut".
ARPA = """\\data\\
ngram 1=6
ngram 2=2

\\1-grams:
-1.0\t<s>\t-0.3
-1.0\t</s>\t0
-2.0\t<unk>\t0
-0.2\tcat\t-0.3
-3.0\tcut\t-0.3
-1.0\tcañon\t0

\\2-grams:
-0.1\t<s> cat
-0.5\tcat </s>

\\end\\
"""


def path_log_probs(path: str, *, ambiguous: dict[int, tuple[str, float]] = {}) -> torch.Tensor:
    """(frames, vocab) log posteriors that put 0.9 on the given character per frame ("_" blank, " " delimiter);
    ambiguous frame -> (second character, its share)."""
    names = {"_": "[PAD]", " ": "|"}
    probs = torch.full((len(path), len(VOCAB)), 0.01)
    for frame, char in enumerate(path):
        probs[frame, VOCAB.tokens.index(names.get(char, char))] = 0.9
    for frame, (char, share) in ambiguous.items():
        probs[frame, VOCAB.tokens.index(char)] = share
    return (probs / probs.sum(-1, keepdim=True)).log()


def test_greedy_words_times_and_confidence():
    log_probs = path_log_probs("__cc_a_t__ _tt_aa_ __")
    transcript = decode_batch(GreedyDecoder(VOCAB, frame_s=FRAME_S), log_probs[None],
                              torch.tensor([len(log_probs)]))[0]
    assert transcript.text == "cat ta"
    first, second = transcript.words
    assert first.word == "cat"
    assert (first.start_s, first.end_s) == (pytest.approx(2 * FRAME_S), pytest.approx(8 * FRAME_S))
    assert (second.start_s, second.end_s) == (pytest.approx(12 * FRAME_S), pytest.approx(17 * FRAME_S))
    assert first.confidence == pytest.approx(0.9 / (0.9 + 0.06), rel=1e-5)


def test_greedy_decoder_text_is_the_collapsed_best_path():
    """The greedy decoder (words and times) gives the text of collapsing the whole best path with decode_ctc, as
    training's dev decoding did before it used the decoder: random posteriors with repeats, blanks, delimiters."""
    generator = torch.Generator().manual_seed(0)
    decoder = GreedyDecoder(VOCAB, frame_s=FRAME_S)
    texts = []
    for frames in [0, 1, 2, *torch.randint(3, 60, (300,), generator=generator).tolist()]:
        log_probs = (3 * torch.randn(frames, len(VOCAB), generator=generator)).log_softmax(dim=-1)
        (transcript,) = decode_batch(decoder, log_probs[None], torch.tensor([frames]))
        assert transcript.text == VOCAB.decode_ctc(log_probs.argmax(dim=-1).tolist())
        texts.append(transcript.text)
    # the paths were varied enough to test something: several words, letters doubled across a blank, [UNK]
    assert any(len(t.split()) >= 3 for t in texts) and any("aa" in t or "tt" in t for t in texts)
    assert any("[UNK]" in t for t in texts)


def test_greedy_stream_in_pieces_equals_one_pass_and_respects_lengths():
    log_probs = path_log_probs("_c_a_tt_ _a_t_ _c_u_t_")
    decoder = GreedyDecoder(VOCAB, frame_s=FRAME_S)
    whole = decode_batch(decoder, log_probs[None], torch.tensor([len(log_probs)]))[0]
    stream = decoder.stream()
    for piece in (log_probs[:5], log_probs[5:6], log_probs[6:]):  # the word "cat" spans the cuts
        stream.step(piece)
    assert stream.finish() == whole
    assert whole.text == "cat at cut"
    padded = torch.stack([log_probs, torch.cat([path_log_probs("_a_"), log_probs[3:]])])
    shorter = decode_batch(decoder, padded, torch.tensor([len(log_probs), 3]))
    assert [t.text for t in shorter] == ["cat at cut", "a"]


@pytest.fixture
def arpa(tmp_path):
    path = tmp_path / "lm.arpa"
    path.write_text(ARPA, encoding="utf-8")
    return path


def test_lm_turns_a_near_tie_towards_the_word_it_prefers(arpa):
    # acoustically "cut" wins by a hair at frame 3: u 0.46, a 0.44
    log_probs = path_log_probs("_c_u_t_ _", ambiguous={3: ("a", 0.44)})
    log_probs[3, VOCAB.tokens.index("u")] = torch.tensor(0.46).log()
    lengths = torch.tensor([len(log_probs)])
    assert decode_batch(GreedyDecoder(VOCAB, frame_s=FRAME_S), log_probs[None], lengths)[0].text == "cut"

    def beam(lm_weight: float):
        options = BeamSearchOptions(str(arpa), beam_size=20, lm_weight=lm_weight, word_score=0.0)
        return decode_batch(BeamSearchDecoder(VOCAB, options, frame_s=FRAME_S), log_probs[None], lengths)[0]

    assert beam(0.0).text == "cut"
    with_lm = beam(1.0)
    assert with_lm.text == "cat"
    (word,) = with_lm.words
    assert word.start_s == pytest.approx(1 * FRAME_S) and word.end_s == pytest.approx(6 * FRAME_S)
    assert 0 < word.confidence < 1


def test_beam_stream_matches_batch_decoding(arpa):
    log_probs = path_log_probs("_c_a_t_ _c_u_t_ _", ambiguous={11: ("a", 0.5)})
    decoder = BeamSearchDecoder(VOCAB, BeamSearchOptions(str(arpa), lm_weight=1.0), frame_s=FRAME_S)
    whole = decode_batch(decoder, log_probs[None], torch.tensor([len(log_probs)]))[0]
    stream = decoder.stream()
    stream.step(log_probs[:9])
    stream.step(log_probs[9:])
    assert stream.finish() == whole
    assert whole.text == "cat cat"
    assert [w.start_s for w in whole.words] == [pytest.approx(FRAME_S), pytest.approx(9 * FRAME_S)]


def test_lexicon_from_arpa_skips_words_the_vocabulary_cannot_spell(arpa):
    entries, skipped = lexicon_from_arpa(arpa, VOCAB)
    assert entries == {"cat": ["c", "a", "t"], "cut": ["c", "u", "t"]}
    assert skipped == 1  # "cañon"


def test_lexicon_file_and_its_errors(tmp_path, arpa):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("cat\tc a t |\ntact\tt a c t\n", encoding="utf-8")
    assert read_lexicon(lexicon, VOCAB) == {"cat": ["c", "a", "t"], "tact": ["t", "a", "c", "t"]}
    lexicon.write_text("cat\tc a t\ncañon\tc a ñ o n\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"lexicon.txt:2: .*'ñ'"):
        read_lexicon(lexicon, VOCAB)
    binary = tmp_path / "lm.bin"
    binary.write_bytes(b"mmap lm http://kheafield.com/code format version 5\x00\x01")
    with pytest.raises(InputError, match="lm.bin: .*--lexicon"):
        BeamSearchDecoder(VOCAB, BeamSearchOptions(str(binary)), frame_s=FRAME_S)
    bad = tmp_path / "bad.arpa"
    bad.write_text("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0\tcat\n\n\\end\\\n", encoding="utf-8")
    with pytest.raises(InputError, match="bad.arpa: cannot load the language model"):
        BeamSearchDecoder(VOCAB, BeamSearchOptions(str(bad)), frame_s=FRAME_S)


def test_a_file_that_is_no_language_model_is_named_for_what_it_is_not(tmp_path, arpa):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("cat\tc a t |\n", encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("cat cut\ncut cat\n", encoding="utf-8")
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.arpa"
    empty.write_bytes(b"")
    for path in (corpus, noise, empty):
        for lexicon_path in (None, str(lexicon)):  # KenLM never sees it: one message either way
            with pytest.raises(InputError) as caught:
                BeamSearchDecoder(VOCAB, BeamSearchOptions(str(path), lexicon_path), frame_s=FRAME_S)
            assert str(caught.value).startswith(f"{path}: not an ARPA file or a KenLM binary (to build an ARPA model "
                                                "from text: speechxfer lm build")
    with pytest.raises(InputError) as caught:
        BeamSearchDecoder(VOCAB, BeamSearchOptions(str(tmp_path)), frame_s=FRAME_S)
    assert str(caught.value) == f"{tmp_path}: a folder, not a language model file"
    # a gzipped ARPA file is one KenLM reads, but its words only come from a lexicon
    packed = tmp_path / "lm.arpa.gz"
    packed.write_bytes(gzip.compress(arpa.read_bytes()))
    with pytest.raises(InputError, match=r"lm\.arpa\.gz: a compressed file holds no readable word list: give "
                                         "--lexicon"):
        BeamSearchDecoder(VOCAB, BeamSearchOptions(str(packed)), frame_s=FRAME_S)
    log_probs = path_log_probs("_c_u_t_ _", ambiguous={3: ("a", 0.44)})
    log_probs[3, VOCAB.tokens.index("u")] = torch.tensor(0.46).log()
    decoder = BeamSearchDecoder(VOCAB, BeamSearchOptions(str(packed), str(lexicon), lm_weight=1.0), frame_s=FRAME_S)
    assert decode_batch(decoder, log_probs[None], torch.tensor([len(log_probs)]))[0].text == "cat"


@pytest.mark.skipif(shutil.which("build_binary") is None, reason="KenLM's build_binary is not on PATH")
def test_kenlm_binary_with_a_lexicon_decodes_like_its_arpa(tmp_path, arpa):
    binary = tmp_path / "lm.bin"
    subprocess.run(["build_binary", str(arpa), str(binary)], check=True, capture_output=True)
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("cat\tc a t |\ncut\tc u t |\n", encoding="utf-8")
    log_probs = path_log_probs("_c_u_t_ _", ambiguous={3: ("a", 0.44)})
    log_probs[3, VOCAB.tokens.index("u")] = torch.tensor(0.46).log()
    texts = [decode_batch(BeamSearchDecoder(VOCAB, BeamSearchOptions(str(lm), str(lexicon), lm_weight=1.0),
                                            frame_s=FRAME_S), log_probs[None], torch.tensor([len(log_probs)]))[0].text
             for lm in (binary, arpa)]
    assert texts == ["cat", "cat"]


def test_greedy_utterance_confidence_is_the_mean_top_posterior_of_non_blank_frames():
    decoder = GreedyDecoder(VOCAB, frame_s=FRAME_S)
    top = 0.9 / (0.9 + 0.06)
    # Frame 3 is ambiguous ("a" at 0.9 against "t" at 0.5): only emitting frames count, blanks (however sure) not.
    log_probs = path_log_probs("__ca_t____", ambiguous={3: ("t", 0.5)})
    transcript = decode_batch(decoder, log_probs[None], torch.tensor([len(log_probs)]))[0]
    ambiguous_top = 0.9 / (0.9 + 0.5 + 0.05)
    assert transcript.confidence == pytest.approx((2 * top + ambiguous_top) / 3, rel=1e-5)
    # More blank frames around the same letters leave it unchanged.
    longer = path_log_probs("________ca_t__________", ambiguous={9: ("t", 0.5)})
    assert decode_batch(decoder, longer[None], torch.tensor([len(longer)]))[0].confidence == \
        pytest.approx(transcript.confidence, rel=1e-5)
    assert decode_batch(decoder, path_log_probs("____")[None], torch.tensor([4]))[0].confidence == 0.0


def test_beam_confidence_is_the_hypothesis_score_per_frame(tmp_path):
    pytest.importorskip("flashlight.lib.text.decoder")
    arpa = tmp_path / "lm.arpa"
    arpa.write_text(ARPA, encoding="utf-8")
    log_probs = path_log_probs("__cc_a_t__")
    scores = {}
    for lm_weight in (0.0, 2.0):
        decoder = BeamSearchDecoder(VOCAB, BeamSearchOptions(str(arpa), lm_weight=lm_weight), frame_s=FRAME_S)
        transcript = decode_batch(decoder, log_probs[None], torch.tensor([len(log_probs)]))[0]
        assert transcript.text == "cat"
        scores[lm_weight] = transcript.confidence
    # Without the LM the score is the path's acoustic log posterior: at most 0, about log 0.9 per frame here.
    assert math.log(0.5) < scores[0.0] < 0
    # The LM's log probability of "cat" (< 0), weighted, lowers it further, spread over the 10 frames.
    assert scores[2.0] < scores[0.0]
