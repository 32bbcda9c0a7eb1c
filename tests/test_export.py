import json

import numpy as np
import pytest
import soundfile as sf
from tiny import make_tiny_checkpoint

from speechxfer.cli import main
from speechxfer.errors import InputError
from speechxfer.export import EXPORT_RECORD, FLOAT32_TOLERANCE, export_model
from speechxfer.scoring import score
from speechxfer.transcribe import EXPORTED_MODEL_FILE, Recognizer

pytest.importorskip("onnxruntime")

CTC_VOCAB = ["[PAD]", "[UNK]", "|", *"abcdefghij"]
# int8 weights and per-batch int8 activations move a random tiny model's log posteriors by up to ~0.1; a frame
# whose two best tokens lie closer than that may change its best token.
INT8_TOLERANCE = 0.5
# Characters of the int8 export's transcripts that differ from the float32 model's (sclite character error rate).
INT8_TRANSCRIPT_CER = 0.10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    source = make_tiny_checkpoint(root / "model", ctc_vocab=CTC_VOCAB)
    (source / "recipe.yaml").write_text("text:\n  lowercase: true\n")
    return source, export_model(source, root / "onnx"), export_model(source, root / "int8", quantize="int8")


def noise(path, *, duration_s: float, seed: int):
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0.05, 1.0, int(duration_s * 10)), 1600)
    sf.write(path, (0.3 * rng.standard_normal(envelope.size) * envelope).astype(np.float32), 16000)
    return path


def test_export_writes_a_folder_the_recognizer_runs_like_the_model(tmp_path, models):
    source, fp32, int8 = models
    assert {p.name for p in fp32.directory.iterdir()} >= {EXPORTED_MODEL_FILE, EXPORT_RECORD, "config.json",
                                                         "vocab.json", "preprocessor_config.json", "recipe.yaml"}
    assert not list(fp32.directory.parent.glob(".*.export"))  # the staging folder is gone
    (tmp_path / "probe").mkdir()  # the mode a folder made by name gets under this umask
    assert fp32.directory.stat().st_mode == (tmp_path / "probe").stat().st_mode
    record = json.loads((int8.directory / EXPORT_RECORD).read_text())
    assert record["quantize"] == "int8" and record["max_log_prob_difference"] == int8.max_log_prob_difference
    assert fp32.max_log_prob_difference <= FLOAT32_TOLERANCE and fp32.frames_agreeing == 1.0
    assert 0 < int8.max_log_prob_difference < INT8_TOLERANCE  # quantized: close, and not the same graph
    # Other lengths than the export's trace and check, in one padded batch.
    waves = [np.asarray(sf.read(noise(tmp_path / f"{i}.wav", duration_s=d, seed=i))[0], dtype=np.float32)
             for i, d in enumerate((2.1, 0.5, 1.4))]
    ours, frames = Recognizer(source, device="cpu").log_probs(waves)
    for result, tolerance in ((fp32, FLOAT32_TOLERANCE), (int8, INT8_TOLERANCE)):
        theirs, their_frames = Recognizer(result.directory).log_probs(waves)
        assert their_frames.tolist() == frames.tolist()
        for item, n in enumerate(frames.tolist()):
            assert (theirs[item, :n] - ours[item, :n]).abs().max() <= tolerance


def test_exported_transcripts_equal_the_models(tmp_path, models, capsys):
    source, fp32, int8 = models
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, duration_s in enumerate((0.8, 1.6, 1.1, 2.4)):
        noise(audio / f"{i}.wav", duration_s=duration_s, seed=10 + i)
    texts = {}
    for name, model in (("model", source), ("onnx", fp32.directory), ("int8", int8.directory)):
        assert main(["transcribe", str(model), str(audio), "--output-dir", str(tmp_path / name),
                     "--format", "tsv"]) == 0
        texts[name] = (tmp_path / name / "transcripts.tsv").read_text()
    capsys.readouterr()
    assert texts["model"].count("\n") == 4
    assert any(line.split("\t")[1] for line in texts["model"].splitlines()), "the random model emits nothing"
    assert texts["onnx"] == texts["model"]
    # The tiny random model's frames are often near ties, and its transcripts are one long "word" of letter salad:
    # int8 changes a few characters of it (4.5% measured), which the tolerance bounds.
    ours = {line.split("\t")[0]: line.split("\t")[1] for line in texts["model"].splitlines()}
    theirs = {line.split("\t")[0]: line.split("\t")[1] for line in texts["int8"].splitlines()}
    assert theirs.keys() == ours.keys()
    assert score(ours, theirs, bootstrap=0).cer <= INT8_TRANSCRIPT_CER


def test_export_refuses_a_full_folder_and_exported_models_refuse_other_settings(tmp_path, models, capsys):
    source, fp32, _ = models
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["export", str(source), str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", str(fp32.directory), str(tmp_path / "again")]) == 2
    assert "is an export already" in capsys.readouterr().err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="--dtype bfloat16: an exported model runs as it was exported"):
        Recognizer(fp32.directory, dtype="bfloat16")
    with pytest.raises(InputError, match="--lang eng"):
        Recognizer(fp32.directory, lang="eng")


def test_a_read_only_output_folder_is_one_line_naming_the_target(tmp_path, models, monkeypatch, capsys):
    from pathlib import Path

    source = models[0]
    make_folder = Path.mkdir

    def read_only(self, *args, **kwargs):  # as a read-only file system answers (root writes past permissions)
        if self.parent == tmp_path:
            raise OSError(30, "Read-only file system", str(self))
        return make_folder(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["export", str(source), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"speechxfer export: error: {tmp_path / 'out'}: Read-only file system"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["graph", "settings"])
def test_a_full_disk_mid_export_is_one_line_naming_the_target_and_leaves_nothing(tmp_path, models, monkeypatch,
                                                                                  capsys, where):
    import torch

    import speechxfer.export as export

    def full(*args, **kwargs):  # as a full disk answers a write, after part of the file is written
        graph = next((a for a in args if isinstance(a, str) and a.endswith(".onnx")), None)
        if graph is not None:
            with open(graph, "wb") as f:
                f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx if where == "graph" else export, "export" if where == "graph" else "_copy_settings",
                        full)
    assert main(["export", str(models[0]), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"speechxfer export: error: {tmp_path / 'out'}: cannot write the export: No space left on device; nothing "
        "was left behind"]
    assert not list(tmp_path.iterdir())
