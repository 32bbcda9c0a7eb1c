import codecs
import gzip
import json
import os

import pytest
from tiny import write_tone

from speechxfer import manifest
from speechxfer.errors import InputError, ManifestError
from speechxfer.manifest import (Utterance, UtteranceTable, check_held_out, load_manifest, read_jsonl, read_manifest,
                                 read_manifest_table, summarize,
                                 write_manifest)


def test_round_trip_stores_paths_relative_to_the_manifest_when_under_it(tmp_path):
    inside = write_tone(tmp_path / "corpus" / "audio" / "a.wav")
    outside = write_tone(tmp_path / "elsewhere" / "b.wav")
    utterances = [
        Utterance("a", str(inside), "hello wörld", 1.0, speaker="s1", language="de"),
        Utterance("b", str(outside), "çà et là", 0.25, offset_s=0.5),
    ]
    manifest = tmp_path / "corpus" / "train.jsonl"
    write_manifest(manifest, utterances)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["audio_path"] == "audio/a.wav"
    assert rows[1]["audio_path"] == str(outside)
    assert "offset_s" not in rows[0] and rows[1]["offset_s"] == 0.5
    assert "wörld" in manifest.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert load_manifest(manifest) == utterances
    assert sorted(os.listdir(manifest.parent)) == ["audio", "train.jsonl"]  # no temporary file left


def test_relative_paths_resolve_against_the_manifest_folder_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "dev.jsonl"
    manifest.write_text(
        json.dumps({"id": "x", "audio_path": "clips/x.wav", "text": "t", "duration_s": 1}) + "\n"
        + json.dumps({"id": "y", "audio_path": "../other/y.flac", "text": "t", "duration_s": 2.5}) + "\n",
        encoding="utf-8")
    monkeypatch.chdir(tmp_path.parent)
    x, y = load_manifest(manifest)
    assert x.audio_path == str(tmp_path / "data" / "clips" / "x.wav")
    assert y.audio_path == str(tmp_path / "other" / "y.flac")
    assert (x.speaker, x.language, x.offset_s, y.duration_s) == (None, None, 0.0, 2.5)


def test_audio_paths_come_back_absolute_and_normal_whatever_their_spelling(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spellings = ["a.wav", "clips/b.wav", "./c.wav", "clips/../d.wav", "clips//e.wav", "clips/./f.wav", ".hidden.wav",
                 "~/g.wav", "/abs/h.wav", "//abs/i.wav", "/abs/../j.wav", "clips/k..wav", "clips.d/l.wav"]
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps({"id": str(k), "audio_path": p, "text": "t", "duration_s": 1}) + "\n"
                                for k, p in enumerate(spellings)), encoding="utf-8")
    folder = str(manifest.parent)
    assert [u.audio_path for u in load_manifest(manifest)] == [
        os.path.normpath(os.path.join(folder, os.path.expanduser(p))) for p in spellings]
    assert load_manifest(manifest)[7].audio_path == str(tmp_path / "home" / "g.wav")


def test_every_bad_row_is_reported_with_its_line_and_skipped(tmp_path):
    write_tone(tmp_path / "ok.wav", duration_s=0.1)
    (tmp_path / "zero.wav").write_bytes(b"")
    good = {"id": "ok", "audio_path": "ok.wav", "text": "fine", "duration_s": 0.1}
    lines = [
        json.dumps(good),                                                  # 1
        "{not json",                                                       # 2
        json.dumps({**good, "id": "m"} | {"text": None}),                  # 3 wrong type
        json.dumps({k: v for k, v in good.items() if k != "duration_s"}),  # 4 missing field
        json.dumps({**good, "id": "u", "durations": 1}),                   # 5 unknown field
        "",                                                                # 6 blank: ignored
        json.dumps(good),                                                  # 7 duplicate
        json.dumps({**good, "id": "e", "text": "  "}),                     # 8
        json.dumps({**good, "id": "z", "duration_s": 0}),                  # 9
        json.dumps({**good, "id": "f", "audio_path": "gone.wav"}),         # 10
        json.dumps({**good, "id": "g", "audio_path": "zero.wav"}),         # 11
        json.dumps(["a", "list"]),                                         # 12
        json.dumps({**good, "id": "b", "duration_s": True}),               # 13
        json.dumps({**good, "id": "ok2"}),                                 # 14
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    utterances, problems = read_manifest(manifest, check_audio=True)
    assert [u.id for u in utterances] == ["ok", "ok2"]
    assert [(p.line, p.kind) for p in problems] == [
        (2, "malformed_row"), (3, "malformed_row"), (4, "malformed_row"), (5, "malformed_row"),
        (7, "duplicate_id"), (8, "empty_text"), (9, "zero_length"), (10, "missing_file"),
        (11, "unreadable_audio"), (12, "malformed_row"), (13, "malformed_row")]
    assert all(p.path == str(manifest) for p in problems)
    assert str(problems[3]) == f"{manifest}:5: [malformed_row] unknown field(s) durations; known: " \
                               "id, audio_path, text, duration_s, speaker, language, offset_s, pseudo_label, confidence"
    # without check_audio the files are not looked at
    assert [u.id for u in read_manifest(manifest)[0]] == ["ok", "f", "g", "ok2"]


def test_load_manifest_stops_at_the_first_bad_row(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio_path": "a.wav", "text": "x", "duration_s": 1}) + "\n"
                        + json.dumps({"id": "b", "audio_path": "b.wav", "text": "", "duration_s": 1}) + "\n"
                        + "[]\n", encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert str(caught.value) == f"{manifest}:2: [empty_text] b: empty transcript (and 1 more bad rows)"
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.jsonl")


def test_write_is_atomic(tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [Utterance("a", str(tmp_path / "a.wav"), "x", 1.0)])
    before = manifest.read_text(encoding="utf-8")

    def failing():
        yield Utterance("b", str(tmp_path / "b.wav"), "y", 1.0)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_manifest(manifest, failing())
    assert manifest.read_text(encoding="utf-8") == before
    assert os.listdir(tmp_path) == ["m.jsonl"]
    with pytest.raises(InputError) as caught:  # a file where its folder should be: that file named, not "File exists"
        write_manifest(manifest / "inside.jsonl", [])
    assert str(caught.value) == f"{manifest}: the output folder is a file"
    assert manifest.read_text(encoding="utf-8") == before


def test_summarize_counts_hours_speakers_and_characters():
    summary = summarize([Utterance("a", "/a.wav", "ab c", 1800.0, speaker="s1"),
                         Utterance("b", "/b.wav", "ça\tb", 900.0, speaker="s2"),
                         Utterance("c", "/c.wav", "a", 900.0, speaker="s1"),
                         Utterance("d", "/d.wav", "z", 0.5)])
    assert summary.utterances == 4
    assert summary.hours == pytest.approx(1.0 + 0.5 / 3600)
    assert summary.speakers == 2
    assert summary.characters == "abczç"
    assert str(summary) == "1.00 h, 4 utterances, 2 speakers, 5 characters: abczç"


def test_read_jsonl_takes_a_byte_order_mark_skips_blank_lines_and_names_bad_lines(tmp_path):
    good = tmp_path / "bom.jsonl"
    good.write_bytes(codecs.BOM_UTF8 + '{"id": "a"}\r\n\n   \n{"id": "b", "text": "x\u2028y"}\n[1]'.encode())
    assert list(read_jsonl(good)) == [(1, {"id": "a"}), (4, {"id": "b", "text": "x\u2028y"}), (5, [1])]
    packed = tmp_path / "rows.jsonl.gz"
    packed.write_bytes(gzip.compress(good.read_bytes()))
    assert list(read_jsonl(packed)) == list(read_jsonl(good))

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a"}\n\n{"id": \n{"id": "\xff"}\n{"id": "c"}\n')
    with pytest.raises(ManifestError, match=r"bad\.jsonl:3: not valid JSON: .*\(column 8\)"):
        list(read_jsonl(bad))
    problems = []
    assert list(read_jsonl(bad, problems=problems)) == [(1, {"id": "a"}), (5, {"id": "c"})]
    assert [(p.path, p.line, p.kind) for p in problems] == [(str(bad), 3, "malformed_row"),
                                                           (str(bad), 4, "malformed_row")]
    assert "not UTF-8" in problems[1].message
    with pytest.raises(ManifestError, match=r"none\.jsonl: cannot read: No such file"):
        list(read_jsonl(tmp_path / "none.jsonl"))


def test_a_byte_order_mark_does_not_spoil_the_first_row(tmp_path):
    manifest = tmp_path / "bom.jsonl"
    manifest.write_text("\ufeff" + json.dumps({"id": "a", "audio_path": "a.wav", "text": "x", "duration_s": 1}) + "\n",
                        encoding="utf-8")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    [a] = load_manifest(manifest)
    assert a.id == "a"


def test_utterances_know_their_manifest_and_line_without_writing_them(tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [Utterance("a", str(tmp_path / "a.wav"), "x", 1.0),
                              Utterance("b", str(tmp_path / "b.wav"), "y", 2.0)])
    a, b = load_manifest(manifest)
    assert (a.manifest, a.line, b.manifest, b.line) == (str(manifest), 1, str(manifest), 2)
    assert str(b.problem("unreadable_audio", "corrupt")) == f"{manifest}:2: [unreadable_audio] b: corrupt"
    copy = tmp_path / "copy.jsonl"
    write_manifest(copy, [a, b])
    assert copy.read_text(encoding="utf-8") == manifest.read_text(encoding="utf-8")  # neither field written
    assert load_manifest(copy) == [a, b]  # and neither compared


@pytest.mark.filterwarnings("ignore:'(aifc|audioop|sunau)' is deprecated:DeprecationWarning")  # audioread's imports
def test_check_files_stats_and_check_audio_reads_headers(tmp_path):
    import numpy as np
    import soundfile as sf

    write_tone(tmp_path / "ok.wav", duration_s=1.0)
    write_tone(tmp_path / "long.wav", duration_s=3.0)
    write_tone(tmp_path / "tiny.wav", duration_s=0.001)
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "text.wav").write_bytes(b"not audio" * 10)
    sf.write(tmp_path / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    rows = [("ok", "ok.wav", 1.0, 0.0),          # 1
            ("close", "ok.wav", 1.05, 0.0),      # 2 within the tolerance
            ("folder", "folder.wav", 1.0, 0.0),  # 3
            ("text", "text.wav", 1.0, 0.0),      # 4
            ("nan", "nan.wav", 1.0, 0.0),        # 5
            ("short", "tiny.wav", 2.0, 0.0),     # 6 a 1 ms file listed as 2 s
            ("part", "long.wav", 1.0, 0.5),      # 7 a span of a longer file
            ("past", "long.wav", 1.0, 2.5)]      # 8 a span past its end
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "audio_path": p, "text": "t", "duration_s": d, "offset_s": o})
                                + "\n" for i, p, d, o in rows), encoding="utf-8")
    kept, problems = read_manifest(manifest, check_files=True)
    assert [(p.line, p.kind) for p in problems] == [(3, "unreadable_audio")]
    assert len(kept) == 7
    kept, problems = read_manifest(manifest, check_audio=True)
    assert [u.id for u in kept] == ["ok", "close", "part"]
    assert [(p.line, p.kind) for p in problems] == [(3, "unreadable_audio"), (4, "unreadable_audio"),
                                                    (5, "unreadable_audio"), (6, "duration_mismatch"),
                                                    (8, "duration_mismatch")]
    assert "NaN or infinite" in problems[2].message
    assert str(problems[3]) == (f"{manifest}:6: [duration_mismatch] short: the manifest lists 2 s, the audio holds "
                                f"0.001 s: {tmp_path / 'tiny.wav'}")


def test_pseudo_label_rows_round_trip_and_old_rows_stay_as_they_were(tmp_path):
    audio = write_tone(tmp_path / "a.wav")
    human = Utterance("h", str(audio), "ab", 1.0)
    pseudo = Utterance("p", str(audio), "ba", 1.0, pseudo_label=True, confidence=0.8125)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [human, pseudo])
    first, second = (json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines())
    assert "pseudo_label" not in first and "confidence" not in first
    assert (second["pseudo_label"], second["confidence"]) == (True, 0.8125)
    assert load_manifest(manifest) == [human, pseudo]
    bad = tmp_path / "bad.jsonl"
    base = {"id": "x", "audio_path": "a.wav", "text": "t", "duration_s": 1}
    bad.write_text("\n".join(json.dumps(base | extra) for extra in (
        {"pseudo_label": 1}, {"confidence": "high"}, {"confidence": True}, {"confidence": None, "id": "ok"})) + "\n"
        + '{"id": "nan", "audio_path": "a.wav", "text": "t", "duration_s": 1, "confidence": NaN}\n', encoding="utf-8")
    kept, problems = read_manifest(bad)
    assert [u.id for u in kept] == ["ok"] and kept[0].confidence is None
    assert [(p.line, p.kind) for p in problems] == [(1, "malformed_row"), (2, "malformed_row"), (3, "malformed_row"),
                                                    (5, "malformed_row")]


def test_check_held_out_refuses_pseudo_labels_in_dev_and_their_audio_or_ids_in_test(tmp_path):
    a, b = write_tone(tmp_path / "a.wav"), write_tone(tmp_path / "b.wav", seed=1)
    (tmp_path / "link.wav").symlink_to(b)
    dev = tmp_path / "dev.jsonl"
    write_manifest(dev, [Utterance("d1", str(a), "ab", 1.0), Utterance("d2", str(b), "ab", 1.0, pseudo_label=True)])
    with pytest.raises(ManifestError, match=r"dev.jsonl:2: dev utterance d2 is pseudo-labelled"):
        check_held_out([], {"dev": load_manifest(dev)})
    test = tmp_path / "test.jsonl"
    write_manifest(test, [Utterance("t1", str(a), "ab", 1.0), Utterance("t2", str(b), "ab", 1.0)])
    pseudo = tmp_path / "pseudo.jsonl"
    write_manifest(pseudo, [Utterance("x", str(tmp_path / "c.wav"), "ab", 1.0, pseudo_label=True),
                            Utterance("y", str(tmp_path / "link.wav"), "ab", 1.0, pseudo_label=True)])
    with pytest.raises(ManifestError, match=r"pseudo.jsonl:2: pseudo-labelled utterance y: its audio file is also in "
                                            r"the test set \(.*test.jsonl:2\)"):
        check_held_out(load_manifest(pseudo), {"test": load_manifest(test)})
    write_manifest(pseudo, [Utterance("t1", str(tmp_path / "c.wav"), "ab", 1.0)])
    with pytest.raises(ManifestError, match=r"pseudo.jsonl:1: .* its id is also in the test set"):
        check_held_out(load_manifest(pseudo), {"test": load_manifest(test)})
    check_held_out([Utterance("z", str(tmp_path / "c.wav"), "ab", 1.0)], {"test": load_manifest(test)})  # no overlap


def test_a_table_holds_the_rows_and_problems_read_manifest_gives(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_tone(tmp_path / "a.wav", duration_s=0.1)
    rows = [{"id": "a", "audio_path": "a.wav", "text": "x", "duration_s": 1, "speaker": "s", "language": "ca"},
            {"id": "b", "audio_path": str(tmp_path / "a.wav"), "text": "y", "duration_s": 2.5, "offset_s": 0.5},
            {"id": "c", "audio_path": "./sub/../a.wav", "text": "z", "duration_s": 1.0, "pseudo_label": True,
             "confidence": 0.75},
            {"id": "d", "audio_path": "~/d.wav", "text": "w", "duration_s": 1.0, "confidence": None},
            {"id": "a", "audio_path": "a.wav", "text": "again", "duration_s": 1.0},
            {"id": "e", "audio_path": "gone.wav", "text": "v", "duration_s": 1.0}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(map(json.dumps, rows)) + "\n\n[]\n", encoding="utf-8")
    for check_files, bad in ((True, [(4, "missing_file"), (5, "duplicate_id"), (6, "missing_file")]),
                             (False, [(5, "duplicate_id")])):
        table, problems = read_manifest_table(manifest, check_files=check_files)
        utterances, expected = read_manifest(manifest, check_files=check_files)
        assert list(table) == utterances and problems == expected and table[-1] == utterances[-1]
        assert [(u.manifest, u.line) for u in table] == [(u.manifest, u.line) for u in utterances]
        assert [(p.line, p.kind) for p in problems] == bad + [(8, "malformed_row")]
    assert [u.audio_path for u in table] == [str(tmp_path / f) for f in ("a.wav", "a.wav", "a.wav", "home/d.wav",
                                                                       "gone.wav")]
    assert table.ids == ["a", "b", "c", "d", "e"] and table.durations_s.tolist() == [1.0, 2.5, 1.0, 1.0, 1.0]
    assert table.pseudo_labels.tolist() == [False, False, True, False, False] and table[2].confidence == 0.75
    other = tmp_path / "other" / "n.jsonl"
    other.parent.mkdir()
    other.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    joined = UtteranceTable.concat([table, read_manifest_table(other)[0]])
    assert joined[:5] == list(table) and joined[5] == load_manifest(other)[0]
    assert (joined[5].manifest, joined[5].line, joined[5].audio_path) == (str(other), 1, str(other.parent / "a.wav"))
    assert len(UtteranceTable.concat([])) == 0


def _row_by_row(monkeypatch):
    """read_manifest_table's answer with every block read row by row (none read at once)."""
    monkeypatch.setattr(manifest, "_clean_block", lambda *args: None)


def test_blocks_read_at_once_give_what_rows_read_one_by_one_give(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_tone(tmp_path / "a.wav", duration_s=0.1)
    (tmp_path / "empty.wav").write_bytes(b"")
    good = {"id": "x", "audio_path": "a.wav", "text": "t u", "duration_s": 1.5}
    variants = [{}, {"speaker": "s", "language": "ca"}, {"speaker": None, "offset_s": 2}, {"confidence": 0.5},
                {"pseudo_label": True, "confidence": None}, {"audio_path": str(tmp_path / "a.wav")},
                {"audio_path": "./a.wav"}, {"audio_path": "sub/../a.wav"}, {"audio_path": "~/a.wav"},
                {"duration_s": 3}, {"text": "ÿ\u2028z"}, {"speaker": "", "language": None}, {"confidence": 1},
                {"duration_s": 1e1, "offset_s": 0.25}, {"text": 'a "quoted" word'}, {"pseudo_label": False},
                {"text": "tab\there\nnew line \\ \u00e9\U0001f600"}, {"confidence": -0.5, "offset_s": -0.0},
                {"duration_s": 10 ** 30}, {"speaker": "s\u0000"}]
    bad = ['{"id": ', "[1, 2]", json.dumps({**good, "durations": 1}), json.dumps({**good, "duration_s": True}),
           json.dumps({**good, "text": " "}), json.dumps({**good, "id": ""}), json.dumps({**good, "duration_s": 0}),
           json.dumps({**good, "offset_s": -1}), json.dumps({**good, "audio_path": "gone.wav"}),
           json.dumps({**good, "audio_path": "empty.wav"}), json.dumps({**good, "speaker": 3}),
           '{"id": "nan", "audio_path": "a.wav", "text": "t", "duration_s": NaN}', "\ufeff" + json.dumps(good),
           json.dumps(good) + " " + json.dumps(good), json.dumps(good) + ", " + json.dumps(good),
           json.dumps(good) + "],[" + json.dumps(good),
           json.dumps({**good, "id": "dup"}), json.dumps(good)[:-1] + ', "confidence": 1e999}',
           # what one JSON reader may take and another refuse: each must come out as json.loads reads it
           json.dumps(good)[:-1] + ', "duration_s": true}', json.dumps(good)[:-1] + ', "duration_s": 2}',
           json.dumps(good)[:-1] + ', "text": ""}', json.dumps(good)[:-1] + ', "duration_s": 1e400}',
           json.dumps({**good, "text": "\ud800"}), b'{"id": "s", "audio_path": "a.wav", "text": "\xed\xa0\x80", '
           b'"duration_s": 1}', json.dumps({**good, "offset_s": None}), json.dumps({**good, "pseudo_label": None}),
           json.dumps({**good, "duration_s": 10 ** 400}), json.dumps({**good, "id": 7}), json.dumps(good) + "\r",
           json.dumps({**good, "text": "a\x01b"}).replace("\\u0001", "\x01"), "\x0c" + json.dumps(good), "1",
           '{"id": "q", "audio_path": "a.wav", "text": "t", "duration_s": true, "id": "r", "duration_s": 1}',
           b"\xff"]
    lines = [json.dumps({**good, "id": f"u{k}", **variants[k % len(variants)]}, ensure_ascii=False) for k in range(60)]
    lines[40] = json.dumps(dict(reversed(json.loads(lines[40]).items())))  # fields in another order
    monkeypatch.setattr(manifest, "_JSONL_BLOCK", 8)
    read_at_once = []
    clean_block = manifest._clean_block
    monkeypatch.setattr(manifest, "_clean_block", lambda *args: read_at_once.append(clean_block(*args))
                        or read_at_once[-1])
    manifest_path = tmp_path / "m.jsonl"
    for spoiled in [None, *range(len(bad))]:
        text = [*lines, json.dumps({**good, "id": "dup"})]
        if spoiled is not None:
            text[(5 + 7 * spoiled) % 60] = bad[spoiled]  # in one block or another
        text.insert(30, "  ")
        manifest_path.write_bytes(b"".join((t if isinstance(t, bytes) else t.encode()) + b"\n" for t in text))
        for check_files in (False, True):
            with monkeypatch.context() as patched:
                _row_by_row(patched)
                rows, expected = read_manifest_table(manifest_path, check_files=check_files)
            table, problems = read_manifest_table(manifest_path, check_files=check_files)
            assert problems == expected, spoiled
            assert list(table) == list(rows) and [u.line for u in table] == [u.line for u in rows]
            assert table.speakers == rows.speakers and table.languages == rows.languages
            assert [u.audio_path for u in table] == [u.audio_path for u in rows]
    where = (5 + 7 * spoiled) % 60
    assert (where + 1 + (where >= 30), "not UTF-8 (invalid start byte)") in [(p.line, p.message) for p in problems]
    assert sum(block is not None for block in read_at_once) > 10  # the clean blocks took the fast path
    # an id met again in a later block that is clean in itself
    manifest_path.write_text("".join(json.dumps({**good, "id": f"u{k % 9}"}) + "\n" for k in range(10)))
    table, problems = read_manifest_table(manifest_path)
    assert len(table) == 9 and [(p.line, p.kind) for p in problems] == [(10, "duplicate_id")]


def test_a_block_of_blank_lines_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "_JSONL_BLOCK", 2)
    row = {"id": "a", "audio_path": "a.wav", "text": "t", "duration_s": 1.0}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n" * 5 + json.dumps({**row, "id": "b"}) + "\n")
    table, problems = read_manifest_table(tmp_path / "m.jsonl")
    assert table.ids == ["a", "b"] and table.lines.tolist() == [1, 6] and not problems


def test_lines_that_only_parse_together_are_each_reported(tmp_path, monkeypatch):
    # Lines read at once must not lend each other brackets or quotes: an object split over two lines, two objects
    # on one line, a string left open before the next line all stay malformed rows, each on its line.
    write_tone(tmp_path / "a.wav", duration_s=0.1)
    row = {"id": "a", "audio_path": "a.wav", "text": "t", "duration_s": 1.0}
    first, rest = json.dumps(row).split(', "text"')
    lines = [first, '"text"' + rest, json.dumps({**row, "id": "b"}) + "],[" + json.dumps({**row, "id": "c"}),
             json.dumps({**row, "id": "d"})[:-1] + ', "speaker": "x', 'y"}', json.dumps({**row, "id": "e"})]
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    table, problems = read_manifest_table(manifest_path, check_files=True)
    assert table.ids == ["e"] and table.lines.tolist() == [6]
    assert [(p.line, p.kind) for p in problems] == [(k, "malformed_row") for k in range(1, 6)]
    assert problems[0].message.startswith("not valid JSON")
    manifest_path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "b"}) + ", "
                             + json.dumps({**row, "id": "c"}) + "\n", encoding="utf-8")
    table, problems = read_manifest_table(manifest_path)
    assert table.ids == ["a"] and [(p.line, p.message) for p in problems] == [(2, "not valid JSON: Extra data "
                                                                                 "(column 67)")]


def test_a_row_nested_thousands_deep_is_a_malformed_row_not_a_recursion_error(tmp_path, monkeypatch):
    row = {"id": "a", "audio_path": "a.wav", "text": "t", "duration_s": 1.0}
    deep = ["[" * 5000 + "]" * 5000, '{"id": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
            json.dumps({**row, "id": "c"})[:-1] + ', "speaker": ' + "[" * 5000 + "]" * 5000 + "}"]
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("\n".join([json.dumps(row), *deep, json.dumps({**row, "id": "b"})]) + "\n")
    for block in (2, manifest._JSONL_BLOCK):  # the deep rows alone in a block, and beside good ones
        monkeypatch.setattr(manifest, "_JSONL_BLOCK", block)
        table, problems = read_manifest_table(manifest_path)
        assert table.ids == ["a", "b"]
        assert [(p.line, p.kind, p.message) for p in problems] == [
            (k, "malformed_row", "JSON nested too deeply to read") for k in (2, 3, 4)]
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: JSON nested too deeply to read"):
        list(read_jsonl(manifest_path))
