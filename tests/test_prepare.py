import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tiny import write_tone

from speechxfer.audio import load_audio
from speechxfer.cli import main
from speechxfer.errors import InputError
from speechxfer.manifest import load_manifest
from speechxfer.prepare import ASTERISK_SOUNDS, Columns, prepare

needs_mp3 = pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile cannot write MP3")


def kinds(result) -> list[tuple[str, int | None, str]]:
    """(file name, line, kind) of each problem, in order."""
    return [(Path(p.path).name, p.line, p.kind) for p in result.problems]


def write_bad_audio(folder: Path) -> None:
    """zero.wav: a valid header without samples; garbage.wav: not audio."""
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    (folder / "garbage.wav").write_bytes(b"RIFF but not really a wave file" * 4)


def write_table(path: Path, header: list[str], rows: list[list[str]], delimiter: str) -> None:
    """CSV with quotes where needed; TSV as Common Voice writes it, fields joined by tabs without quoting."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        if delimiter == "\t":
            f.writelines("\t".join(row) + "\n" for row in [header, *rows])
        else:
            csv.writer(f, lineterminator="\n").writerows([header, *rows])


@needs_mp3
def test_commonvoice_release_with_mp3_clips(tmp_path):
    cv = tmp_path / "cv-corpus" / "cy"
    for i, seconds in enumerate((0.6, 0.9, 1.2)):
        data, rate = sf.read(write_tone(tmp_path / f"src{i}.wav", duration_s=seconds, sample_rate_hz=48000))
        (cv / "clips").mkdir(parents=True, exist_ok=True)
        sf.write(cv / "clips" / f"common_voice_cy_{i}.mp3", data, rate, format="MP3")
    header = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
              "gender", "accents", "variant", "locale", "segment"]

    def row(client, clip, sentence):
        return [client, clip, "sid", sentence, "", "2", "0", "", "", "", "", "cy", ""]

    write_table(cv / "train.tsv", header, [
        row("c1", "common_voice_cy_0.mp3", 'Mae "dyfyniad" yma'),    # line 2, an unbalanced quote is fine
        row("c2", "common_voice_cy_1.mp3", "Bore da"),               # 3
        row("c1", "common_voice_cy_9.mp3", "Nos da"),                # 4 missing clip
        row("c2", "common_voice_cy_1.mp3", "Bore da eto"),           # 5 duplicate
        row("c3", "common_voice_cy_2.mp3", ""),                      # 6 empty sentence
    ], "\t")
    with open(cv / "train.tsv", "a", encoding="utf-8") as f:
        f.write("c4\tcommon_voice_cy_2.mp3\ttoo few fields\n")       # 7 malformed
    write_table(cv / "dev.tsv", header, [row("c3", "common_voice_cy_2.mp3", "Diolch yn fawr")], "\t")
    write_table(cv / "test.tsv", header, [], "\t")

    result = prepare("commonvoice", cv, tmp_path / "out")
    assert list(result.manifests) == ["train", "dev", "test"]
    train = load_manifest(tmp_path / "out" / "train.jsonl")
    assert [(u.id, u.text, u.speaker, u.language) for u in train] == [
        ("common_voice_cy_0", 'Mae "dyfyniad" yma', "c1", "cy"), ("common_voice_cy_1", "Bore da", "c2", "cy")]
    assert [u.duration_s for u in train] == pytest.approx([0.6, 0.9], abs=0.03)
    assert sorted(kinds(result)) == [("train.tsv", 4, "missing_file"), ("train.tsv", 5, "duplicate_id"),
                                     ("train.tsv", 6, "empty_text"), ("train.tsv", 7, "malformed_row")]
    assert result.summaries["dev"].utterances == 1 and result.summaries["test"].utterances == 0
    assert result.summaries["train"].speakers == 2
    # 48 kHz MP3 comes back as 16 kHz
    assert abs(load_audio(train[1].audio_path).shape[0] - 0.9 * 16000) < 600

    with pytest.raises(InputError, match="no validated.tsv"):
        prepare("commonvoice", cv, tmp_path / "out2", splits=["train", "validated"])


def test_csv_folder_with_named_columns_and_every_bad_row_kind(tmp_path):
    audio = tmp_path / "corpus" / "wavs"
    write_tone(audio / "a.wav", duration_s=0.5)
    write_tone(audio / "stereo44k.wav", duration_s=0.75, sample_rate_hz=44100, channels=2)
    write_bad_audio(audio)
    header = ["wav_file", "transcript_text", "spk"]
    write_table(tmp_path / "corpus" / "train.csv", header, [
        ["wavs/a.wav", "first, with a comma", "s1"],          # 2
        ["wavs/stereo44k.wav", "line one\nline two", "s2"],   # 3-4 a quoted field over two lines
        ["wavs/missing.wav", "gone", "s1"],                   # 5
        ["wavs/zero.wav", "no samples", "s1"],                # 6
        ["wavs/garbage.wav", "not audio", "s1"],              # 7
        ["wavs/a.wav", "again", "s1"],                        # 8 duplicate id (from the file name)
    ], ",")
    with open(tmp_path / "corpus" / "train.csv", "a", encoding="utf-8") as f:
        f.write("wavs/a.wav,too,many,fields\n")               # 9
    write_table(tmp_path / "corpus" / "validation.csv", header, [["wavs/a.wav", "  ", "s1"]], ",")

    result = prepare("csv", tmp_path / "corpus", tmp_path / "out",
                     columns=Columns(audio="wav_file", text="transcript_text", speaker="spk"))
    assert list(result.manifests) == ["train", "dev"]
    assert kinds(result) == [("train.csv", 9, "malformed_row"), ("train.csv", 5, "missing_file"),
                             ("train.csv", 6, "zero_length"), ("train.csv", 7, "unreadable_audio"),
                             ("train.csv", 8, "duplicate_id"), ("validation.csv", 2, "empty_text")]
    assert str(result.problems[1]).startswith(f"{tmp_path / 'corpus' / 'train.csv'}:5: [missing_file] missing: ")
    a, stereo = load_manifest(result.manifests["train"])
    assert (a.id, a.speaker, a.duration_s) == ("a", "s1", 0.5)
    assert stereo.text == "line one\nline two" and stereo.duration_s == 0.75
    samples = load_audio(stereo.audio_path)
    assert samples.shape == (12000,) and samples.dtype == np.float32
    assert result.summaries["dev"].utterances == 0


def test_csv_column_errors_name_the_file_and_header_line(tmp_path):
    write_table(tmp_path / "t.csv", ["file", "words"], [["a.wav", "x"]], ",")
    with pytest.raises(InputError) as caught:
        prepare("csv", tmp_path / "t.csv", tmp_path / "out")
    assert str(caught.value).startswith(f"{tmp_path / 't.csv'}:1: no text column")
    with pytest.raises(InputError, match="no speaker column 'spk'"):
        prepare("csv", tmp_path / "t.csv", tmp_path / "out", columns=Columns(text="words", speaker="spk"))
    with pytest.raises(InputError, match="column names apply to csv, tsv and audiofolder"):
        prepare("nemo", tmp_path / "t.csv", tmp_path / "out", columns=Columns(text="words"))


def test_text_that_is_not_utf8_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "train.csv").write_bytes("audio,text\na.wav,ok\nb.wav,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError) as caught:
        prepare("csv", tmp_path / "train.csv", tmp_path / "out")
    assert str(caught.value).startswith(f"{tmp_path / 'train.csv'}:3: not UTF-8")


def test_tsv_file_with_a_duration_column_and_a_split_name(tmp_path):
    write_tone(tmp_path / "long.wav", duration_s=2.0)
    write_table(tmp_path / "all.tsv", ["utt", "audio", "text", "duration"], [
        ["u1", "long.wav", "uno", "1.5"],
        ["u2", "long.wav", "dos", "2.5"],      # longer than the file
        ["u3", "long.wav", "tres", "soon"],    # not a number
        ["u4", "long.wav", "cuatro", "0"],
    ], "\t")
    result = prepare("tsv", tmp_path / "all.tsv", tmp_path / "out", split="test", language="es",
                     columns=Columns(id="utt"))
    assert kinds(result) == [("all.tsv", 4, "malformed_row"), ("all.tsv", 3, "bad_segment"),
                             ("all.tsv", 5, "zero_length")]
    [u1] = load_manifest(result.manifests["test"])
    assert (u1.id, u1.duration_s, u1.language) == ("u1", 1.5, "es")


def test_kaldi_data_dirs_with_segments_utt2spk_and_a_piped_command(tmp_path):
    rec = write_tone(tmp_path / "audio" / "rec1.wav", duration_s=3.0)
    solo = write_tone(tmp_path / "audio" / "solo.flac", duration_s=0.8)
    train, dev = tmp_path / "data" / "train", tmp_path / "data" / "dev"
    train.mkdir(parents=True)
    dev.mkdir()
    (train / "wav.scp").write_text(f"rec1 {rec}\nrec2 sox other.wav -t wav - |\nrec3 feats.ark:1234\n",
                                   encoding="utf-8")
    (train / "segments").write_text("utt1 rec1 0.00 1.20\nutt2 rec1 1.20 2.70\nutt3 rec1 2.50 3.60\n"
                                    "utt4 rec2 0 1\nutt5 rec1 x 1\n", encoding="utf-8")
    (train / "text").write_text("utt1 un deux\nutt2 trois quatre\nutt3 trop long\nutt4 piped\nutt5 bad\n"
                                "utt6 nowhere\n", encoding="utf-8")
    (train / "utt2spk").write_text("utt1 spkA\nutt2 spkB\n", encoding="utf-8")
    (dev / "wav.scp").write_text(f"solo {solo}\n", encoding="utf-8")
    (dev / "text").write_text("solo  cinq   six \n", encoding="utf-8")

    result = prepare("kaldi", tmp_path / "data", tmp_path / "out", language="fr")
    assert kinds(result) == [("wav.scp", 2, "malformed_row"), ("wav.scp", 3, "malformed_row"),
                             ("segments", 5, "malformed_row"),
                             ("text", 4, "missing_file"), ("text", 5, "missing_file"),
                             ("text", 6, "missing_file"), ("text", 3, "bad_segment")]
    assert "piped commands are not supported" in result.problems[0].message
    utt1, utt2 = load_manifest(result.manifests["train"])
    assert (utt1.offset_s, utt1.duration_s, utt1.speaker) == (0.0, 1.2, "spkA")
    assert (utt2.offset_s, utt2.duration_s, utt2.speaker) == (1.2, pytest.approx(1.5), "spkB")
    assert load_audio(utt2.audio_path, offset_s=utt2.offset_s, duration_s=utt2.duration_s).shape == (24000,)
    [solo_utt] = load_manifest(result.manifests["dev"])
    assert (solo_utt.text, solo_utt.duration_s, solo_utt.language) == ("cinq   six", 0.8, "fr")

    single = prepare("kaldi", dev, tmp_path / "out1")
    assert list(result.manifests)[:2] == ["train", "dev"] and list(single.manifests) == ["dev"]


def test_audiofolder_with_split_subfolders(tmp_path):
    root = tmp_path / "hf"
    for split, names in (("train", ["a", "b"]), ("validation", ["c"]), ("test", ["d"])):
        for name in names:
            write_tone(root / split / f"{name}.wav", duration_s=0.3)
        write_table(root / split / "metadata.csv", ["file_name", "transcription", "speaker_id"],
                    [[f"{name}.wav", f"text {name}", "spk"] for name in names], ",")
    result = prepare("audiofolder", root, tmp_path / "out")
    assert list(result.manifests) == ["train", "dev", "test"] and result.problems == []
    assert [u.text for u in load_manifest(result.manifests["train"])] == ["text a", "text b"]
    assert load_manifest(result.manifests["dev"])[0].speaker == "spk"


def test_audiofolder_with_metadata_jsonl(tmp_path):
    root = tmp_path / "hf"
    for name in ("a", "b", "c"):
        write_tone(root / "data" / f"{name}.wav", duration_s=0.3)
    lines = [json.dumps({"file_name": "data/a.wav", "sentence": "text a", "speaker_id": 7}),
             "",
             json.dumps({"file_name": "data/b.wav", "sentence": "text b"}),  # no speaker: read as empty
             '{"file_name": "data/c.wav", "sentence": ',
             json.dumps(["data/c.wav", "text c"])]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    result = prepare("audiofolder", root, tmp_path / "out")
    train = load_manifest(result.manifests["train"])
    assert [(u.text, u.speaker) for u in train] == [("text a", "7"), ("text b", None)]
    assert [(p.line, p.kind) for p in result.problems] == [(4, "malformed_row"), (5, "malformed_row")]
    assert all(p.path.endswith("metadata.jsonl") for p in result.problems)

    (root / "metadata.csv").write_text("file_name,sentence\ndata/a.wav,x\n")
    with pytest.raises(InputError, match="both metadata.csv and metadata.jsonl"):
        prepare("audiofolder", root, tmp_path / "out2")


def test_nemo_manifests_with_offsets(tmp_path):
    write_tone(tmp_path / "audio" / "long.wav", duration_s=2.0)
    lines = [
        {"audio_filepath": "audio/long.wav", "text": "first half", "duration": 1.0, "offset": 0.0},
        {"audio_filepath": "audio/long.wav", "text": "second half", "duration": 1.0, "offset": 1.0, "lang": "pl"},
        {"audio_filepath": "audio/long.wav", "text": "no duration"},
        {"audio_filepath": "audio/long.wav", "text": 5, "duration": 1.0},
        {"text": "no audio"},
    ]
    manifest = tmp_path / "train_manifest.json"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{oops\n", encoding="utf-8")
    result = prepare("nemo", manifest, tmp_path / "out")
    assert kinds(result) == [("train_manifest.json", 4, "malformed_row"), ("train_manifest.json", 5, "malformed_row"),
                             ("train_manifest.json", 6, "malformed_row"), ("train_manifest.json", 3, "duplicate_id")]
    first, second = load_manifest(result.manifests["train"])
    assert (first.id, first.offset_s, first.duration_s) == ("long", 0.0, 1.0)
    assert (second.id, second.offset_s, second.language) == ("long-00001000", 1.0, "pl")


def write_asterisk_folder(root: Path) -> Path:
    folder = root / "xx"
    for prompt in ("hello", "goodbye", "digits/1", "letters/o", "no-text", "beep"):
        write_tone(folder / f"{prompt}.wav", duration_s=0.2, sample_rate_hz=8000)
    (folder / "core-sounds-xx.txt").write_text(
        "\ufeff; Core Asterisk Sounds in Test\n"   # 1
        "\n"                                       # 2
        "hello: Hello there.\n"                    # 3
        "goodbye: Good [bye] now\n"                # 4 a bracketed word is spoken
        "digits/1: one\n"                          # 5
        "letters/O: oh\n"                          # 6 case differs from the file
        "beep: [a beep]\n"                         # 7 not speech
        "silent:\n"                                # 8
        "absent: not recorded\n"                   # 9
        "just some words\n"                        # 10
        "hello: duplicate\n",                      # 11
        encoding="utf-8")
    return folder


def test_asterisk_prompts_split_by_a_stable_hash(tmp_path):
    folder = write_asterisk_folder(tmp_path)
    result = prepare("asterisk", folder, tmp_path / "out")
    assert sorted(kinds(result), key=str) == sorted([
        ("core-sounds-xx.txt", 7, "non_speech"), ("core-sounds-xx.txt", 10, "malformed_row"),
        ("core-sounds-xx.txt", 8, "empty_text"), ("core-sounds-xx.txt", 9, "missing_file"),
        ("core-sounds-xx.txt", 11, "duplicate_id"), ("no-text.wav", None, "no_transcript")], key=str)
    utterances = {u.id: u for split in result.manifests.values() for u in load_manifest(split)}
    assert {k: u.text for k, u in utterances.items()} == {
        "hello": "Hello there.", "goodbye": "Good bye now", "digits/1": "one", "letters/o": "oh"}
    assert {(u.speaker, u.language, u.duration_s) for u in utterances.values()} == {("xx", "xx", 0.2)}
    again = prepare("asterisk", folder, tmp_path / "again")
    assert {s: m.read_text() for s, m in again.manifests.items()} == {
        s: m.read_text() for s, m in result.manifests.items()}
    assert list(prepare("asterisk", folder, tmp_path / "all", split="test").manifests) == ["test"]


def test_asterisk_folder_of_gsm_prompts_says_so(tmp_path):
    folder = tmp_path / "es"
    (folder / "digits").mkdir(parents=True)
    for prompt in ("hello", "digits/1"):
        (folder / f"{prompt}.gsm").write_bytes(b"\xd0" * 33)
    (folder / "core-sounds-es.txt").write_text("hello: hola\ndigits/1: uno\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"no \.wav prompts .*\(2 \.gsm\): install asterisk-core-sounds-<lang>-wav"
                       ) as err:
        prepare("asterisk", folder, tmp_path / "out")
    assert str(folder) in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (ASTERISK_SOUNDS / "es").is_dir(), reason="asterisk-core-sounds-es-wav is not installed")
def test_asterisk_debian_spanish_prompts(tmp_path):
    result = prepare("asterisk", "es", tmp_path / "out")
    assert result.utterances > 400
    assert list(result.manifests) == ["train", "dev", "test"]
    assert 0.7 < result.summaries["train"].utterances / result.utterances < 0.9
    utterance = load_manifest(result.manifests["train"])[0]
    assert utterance.language == "es" and load_audio(utterance.audio_path).dtype == np.float32


def test_cli_prints_problems_and_summary_and_exits_0(tmp_path, capsys):
    write_tone(tmp_path / "a.wav", duration_s=0.5)
    write_table(tmp_path / "train.csv", ["audio", "text"], [["a.wav", "hello"], ["b.wav", "missing"]], ",")
    assert main(["prepare", "csv", str(tmp_path / "train.csv"), str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'train.csv'}:3: [missing_file]" in err
    assert "1 problem; all listed in" in err
    assert out.startswith("train: 0.00 h, 1 utterance, 0 speakers, 4 characters: ehlo")
    assert (tmp_path / "out" / "problems.txt").read_text().count("\n") == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["train"]["utterances"] == 1

    assert main(["prepare", "csv", str(tmp_path / "train.csv"), str(tmp_path / "out"), "--strict"]) == 2
    assert "error: " in capsys.readouterr().err


def test_cli_fails_cleanly_when_nothing_is_usable_or_the_layout_is_wrong(tmp_path, capsys):
    write_table(tmp_path / "train.csv", ["audio", "text"], [["b.wav", "missing"]], ",")
    assert main(["prepare", "csv", str(tmp_path / "train.csv"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"speechxfer prepare: error: {tmp_path / 'train.csv'}: no usable utterances "
                        "(1 problem)\n")
    assert main(["prepare", "csv", str(tmp_path / "train.csv"), str(tmp_path / "out"), "--text-column", "words"]) == 2
    assert "train.csv:1: no text column 'words'" in capsys.readouterr().err
    assert main(["prepare", "kaldi", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


def write_non_finite_audio(folder: Path) -> None:
    """nan.wav and inf.wav: float WAVs whose headers are fine but whose samples are not finite."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = np.full(16000, 0.1, dtype=np.float32)
    samples[8000] = np.nan
    sf.write(folder / "nan.wav", samples, 16000, subtype="FLOAT")
    samples[8000] = -np.inf
    sf.write(folder / "inf.wav", samples, 16000, subtype="FLOAT")


def test_non_finite_audio_and_folders_are_rejected_in_every_format(tmp_path):
    audio = tmp_path / "audio"
    write_non_finite_audio(audio)
    write_tone(audio / "ok.wav", duration_s=0.5, subtype="FLOAT")
    (audio / "folder.wav").mkdir()
    # csv, with a byte-order mark as spreadsheet programs write it
    (tmp_path / "train.csv").write_text("\ufeffaudio_path,text\naudio/ok.wav,fine\naudio/nan.wav,n\n"
                                        "audio/inf.wav,i\naudio/folder.wav,f\n", encoding="utf-8")
    result = prepare("csv", tmp_path / "train.csv", tmp_path / "csv")
    assert kinds(result) == [("train.csv", 3, "unreadable_audio"), ("train.csv", 4, "unreadable_audio"),
                             ("train.csv", 5, "unreadable_audio")]
    assert [p.message for p in result.problems] == [
        f"nan: audio holds NaN or infinite samples: {audio / 'nan.wav'}",
        f"inf: audio holds NaN or infinite samples: {audio / 'inf.wav'}",
        f"folder: a folder, not an audio file: {audio / 'folder.wav'}"]
    assert [u.id for u in load_manifest(result.manifests["train"])] == ["ok"]
    # kaldi: both segments of a recording with a NaN in it
    kaldi = tmp_path / "kaldi" / "train"
    kaldi.mkdir(parents=True)
    (kaldi / "wav.scp").write_text(f"rec {audio / 'nan.wav'}\nok {audio / 'ok.wav'}\n", encoding="utf-8")
    (kaldi / "segments").write_text("a rec 0 0.4\nb rec 0.4 0.9\nok ok 0 0.5\n", encoding="utf-8")
    (kaldi / "text").write_text("a one\nb two\nok three\n", encoding="utf-8")
    result = prepare("kaldi", kaldi, tmp_path / "kaldi-out")
    assert kinds(result) == [("text", 1, "unreadable_audio"), ("text", 2, "unreadable_audio")]
    # nemo
    (tmp_path / "train_manifest.json").write_text(
        "".join(json.dumps({"audio_filepath": f"audio/{name}.wav", "text": name}) + "\n" for name in ("ok", "inf")),
        encoding="utf-8")
    result = prepare("nemo", tmp_path / "train_manifest.json", tmp_path / "nemo")
    assert kinds(result) == [("train_manifest.json", 2, "unreadable_audio")]
