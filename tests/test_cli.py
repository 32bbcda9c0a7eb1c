"""The command line as a user meets it: bad input gives one line naming the file and exit code 2, never a
traceback."""

import json
import subprocess
import sys

import pytest
from tiny import make_tiny_checkpoint, write_tone

from speechxfer.cli import main
from speechxfer.errors import InputError
from speechxfer.surgery import build_ctc_model
from speechxfer.vocabulary import Vocabulary

CTC_VOCAB = ["[PAD]", "[UNK]", "|", *"abcdefghij"]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A tiny model, its broken copies, a clip and a few things that are not what they claim to be."""
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_checkpoint(root / "model", ctc_vocab=CTC_VOCAB)
    truncated = root / "truncated"
    truncated.mkdir()
    for f in model.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = (model / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    garbage = root / "garbage"
    garbage.mkdir()
    for f in model.iterdir():
        (garbage / f.name).write_bytes(f.read_bytes())
    (garbage / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    write_tone(root / "clip.wav", duration_s=0.5)
    (root / "a_file").write_text("not a folder\n")
    (root / "runs").mkdir()
    (root / "dev.jsonl").write_text(json.dumps({"id": "u1", "audio": str(root / "clip.wav"), "text": "abc",
                                                "duration_s": 0.5}) + "\n")
    return root


def one_line_error(capsys, argv: list[str], *, names: str) -> str:
    """Run the command; it must fail with exit code 2 and one line on stderr that names `names`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    command = argv[0]
    assert len(err) == 1 and err[0].startswith(f"speechxfer {command}: error: "), err
    assert names in err[0], err
    return err[0]


@pytest.mark.parametrize(("model", "message"), [
    ("truncated", "model.safetensors is truncated or not a safetensors file"),
    ("garbage", "model.safetensors is truncated or not a safetensors file"),
    ("bert", "a 'bert' checkpoint, not wav2vec2"),
    ("a_file", "not a file"),
    ("runs/typo", "no such model folder"),
    ("./typo", "no such model folder"),
    ("a/b/c", "no such model folder"),
])
def test_bad_models_in_transcribe_and_evaluate(place, capsys, monkeypatch, model, message):
    monkeypatch.chdir(place)
    for argv in (["transcribe", model, "clip.wav", "--device", "cpu"],
                 ["evaluate", model, "dev.jsonl", "--output-dir", "eval", "--device", "cpu"]):
        assert message in one_line_error(capsys, argv, names=model)


def test_bad_models_in_lm_tune_and_in_train_surgery(place, capsys, monkeypatch):
    monkeypatch.chdir(place)
    (place / "lm.arpa").write_text("\\data\\\n")
    one_line_error(capsys, ["lm", "tune", "truncated", "dev.jsonl", "--lm", "lm.arpa", "--device", "cpu"],
                   names="truncated")
    # train builds its model through the same loader
    with pytest.raises(InputError, match="garbage: model.safetensors is truncated"):
        build_ctc_model("garbage", Vocabulary.from_texts(["abc"]))


@pytest.mark.parametrize(("argv", "names", "message"), [
    (["transcribe", "model", "clip.wav", "--output-dir", "a_file"], "a_file", "the output folder is a file"),
    (["evaluate", "model", "dev.jsonl", "--output-dir", "a_file"], "a_file", "the output folder is a file"),
    (["transcribe", "model", "clip.wav", "--device", "bogus"], "bogus", "unknown device"),
    (["evaluate", "model", "nothing.jsonl"], "nothing.jsonl", "cannot read manifest"),
    (["transcribe", "model", "clip.wav", "--chunk-s", "0.001"], "--chunk-s", "receptive field"),
    (["transcribe", "model", "clip.wav", "--max-batch-s", "-5"], "--max-batch-s", "more than 0"),
    (["transcribe", "model", "clip.wav", "--stride-s", "-1"], "--stride-s", "at least 0"),
    (["transcribe", "model", "clip.wav", "--chunk-s", "0"], "--chunk-s", "more than 0"),
    (["transcribe", "model", "clip.wav", "--lm", "x.arpa", "--beam-size", "0"], "--beam-size", "at least 1"),
    (["lm", "tune", "model", "dev.jsonl", "--lm", "x.arpa", "--lm-weights", "inf"], "--lm-weight", "finite"),
    (["wer", "dev.jsonl", "dev.jsonl", "--per-utterance", "runs"], "runs", "directory"),
    (["prepare", "kaldi", "a_file", "prepared"], "a_file", "not a folder"),
])
def test_bad_input_gives_one_line(place, capsys, monkeypatch, argv, names, message):
    monkeypatch.chdir(place)
    if argv[0] in ("transcribe", "evaluate", "lm"):
        at = 2 if argv[0] == "lm" else 1  # before the case's own options: a --device there wins
        argv = argv[:at] + ["--device", "cpu"] + argv[at:]
    assert message in one_line_error(capsys, argv, names=names)


def test_cuda_without_a_gpu(place, capsys, monkeypatch):
    monkeypatch.chdir(place)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    message = one_line_error(capsys, ["transcribe", "model", "clip.wav", "--device", "cuda"], names="'cuda'")
    assert "no CUDA GPU" in message


def test_a_user_sees_no_traceback(place):
    """The whole program, as a subprocess: the line, the exit code, nothing else."""
    done = subprocess.run([sys.executable, "-m", "speechxfer", "transcribe", "truncated", "clip.wav", "--device",
                           "cpu"], cwd=place, capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("speechxfer transcribe: error: truncated: ")


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`speechxfer wer ... | head`: the reader stops reading; the command stops without a traceback, as cat does."""
    (tmp_path / "ref.txt").write_text("".join(f"a b c {i}\n" for i in range(200)))
    (tmp_path / "hyp.txt").write_text("".join(f"a x c {i}\n" for i in range(200)))
    process = subprocess.Popen([sys.executable, "-m", "speechxfer", "wer", "ref.txt", "hyp.txt", "--worst", "200",
                                "--bootstrap", "0"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # gone before the first line is written
    stderr = process.stderr.read().decode()
    assert process.wait() == 1
    assert stderr == "", stderr
