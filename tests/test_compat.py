import gc
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from transformers import Wav2Vec2ForCTC

from speechxfer import cli, compat
from speechxfer.errors import SpeechxferError
from tiny import make_tiny_checkpoint, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["4.45.2", "4.56.1", "3.5.0", "0.0.1.dev0"])
def test_an_older_transformers_is_refused_with_the_floor_named(version):
    with pytest.raises(SpeechxferError) as err:
        compat.check_transformers_version(version)
    message = str(err.value)
    assert f"transformers {version} is older than {compat.TRANSFORMERS_MIN_VERSION}" in message
    assert f"pip install 'transformers>={compat.TRANSFORMERS_MIN_VERSION}'" in message
    assert "\n" not in message


@pytest.mark.parametrize("version", [compat.TRANSFORMERS_MIN_VERSION, "4.57.6", "4.57.0.dev0", "4.100.0", "5.24.0"])
def test_the_floor_and_newer_releases_pass(version):
    compat.check_transformers_version(version)


def test_the_installed_transformers_passes():
    compat.check_transformers_version()


def test_the_cli_stops_on_an_old_transformers_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compat.importlib.metadata, "version", lambda name: "4.45.0")
    ref = tmp_path / "ref.txt"
    ref.write_text("a b\n", encoding="utf-8")
    assert cli.main(["wer", str(ref), str(ref)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"speechxfer wer: error: transformers 4.45.0 is older than "
                            f"{compat.TRANSFORMERS_MIN_VERSION}, the oldest speechxfer works with: "
                            f"pip install 'transformers>={compat.TRANSFORMERS_MIN_VERSION}'\n")


def test_the_floor_is_the_one_pyproject_declares():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert f"transformers>={compat.TRANSFORMERS_MIN_VERSION}" in dependencies


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_load_report_of_a_headless_source_is_dropped_and_only_while_loading(tmp_path):
    source = make_tiny_checkpoint(tmp_path / "ssl")  # no CTC head: the report lists lm_head as missing
    report_logger = logging.getLogger("transformers.modeling_utils")
    records = _Records()
    report_logger.addHandler(records)
    try:
        Wav2Vec2ForCTC.from_pretrained(source, use_safetensors=True)
        assert any("lm_head" in m for m in records.messages)  # the report compat drops is still there to drop
        records.messages.clear()
        filters = list(report_logger.filters)
        with compat.quiet_load_report():
            Wav2Vec2ForCTC.from_pretrained(source, use_safetensors=True)
            report_logger.warning("an unrelated warning")
        assert records.messages == ["an unrelated warning"]
        assert report_logger.filters == filters
    finally:
        report_logger.removeHandler(records)


def test_optional_model_file_finds_a_file_and_says_none_for_a_missing_one(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ctc", ctc_vocab=["[PAD]", "[UNK]", "|", "a"])
    assert Path(compat.optional_model_file(str(folder), "vocab.json")) == folder / "vocab.json"
    assert compat.optional_model_file(str(folder), "no_such_file.json") is None


def test_the_feature_encoder_flag_is_the_one_freeze_clears():
    model = Wav2Vec2ForCTC(tiny_config())
    encoder = model.wav2vec2.feature_extractor
    model.freeze_feature_encoder()
    assert encoder._requires_grad is False
    compat.mark_feature_encoder_trainable(encoder)
    assert encoder._requires_grad is True


def test_gradient_checkpointing_is_enabled_non_reentrant_without_a_deprecation_warning():
    import warnings

    model = Wav2Vec2ForCTC(tiny_config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated alias of transformers 5 warns
        compat.enable_gradient_checkpointing(model)
    layers = model.wav2vec2.encoder.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}


def test_reset_accelerator_state_forgets_the_precision_of_an_earlier_accelerator():
    from accelerate import Accelerator

    compat.reset_accelerator_state()
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    # without the reset, accelerate's singleton would hand the second Accelerator bf16 again
    compat.reset_accelerator_state()
    assert Accelerator(cpu=True).mixed_precision == "no"
    compat.reset_accelerator_state()


def test_gc_paused_restores_the_collector_as_it_found_it_even_after_an_error():
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with compat.gc_paused():
            assert not gc.isenabled()
            with compat.gc_paused():  # nested: the inner one leaves it paused
                pass
            assert not gc.isenabled()
            raise KeyError
    assert gc.isenabled()
    gc.disable()
    try:
        with compat.gc_paused():
            pass
        assert not gc.isenabled()  # paused by the caller: not switched on behind its back
    finally:
        gc.enable()


def test_a_progress_bar_shows_unless_hidden_or_tqdm_disable_is_set():
    # tqdm reads TQDM_* variables when it is imported: a fresh interpreter for each environment
    bars = ("import io; from speechxfer.compat import progress_bar\n"
            "for show in (True, False):\n"
            "    out = io.StringIO()\n"
            "    with progress_bar(show=show, total=3, file=out) as bar: bar.update(3)\n"
            "    print('3/3' in out.getvalue())")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TQDM_DISABLE", None)
    for extra, shown in (({}, "True\nFalse\n"), ({"TQDM_DISABLE": "1"}, "False\nFalse\n")):
        done = subprocess.run([sys.executable, "-c", bars], env=env | extra, capture_output=True, text=True,
                              timeout=60)
        assert (done.returncode, done.stdout) == (0, shown), done.stderr


def test_write_failure_reads_what_the_system_said_from_safetensors_and_os_errors(tmp_path):
    import errno

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    with pytest.raises(SafetensorError) as caught:  # safetensors' own error for a write the system refuses
        save_file({"a": torch.zeros(2)}, tmp_path / "missing" / "a.safetensors")
    assert compat.write_failure(caught.value) == os.strerror(errno.ENOENT)
    assert compat.write_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x")) == "No space left on device"
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(SafetensorError) as caught:  # not a write the system refused
        load_file(tmp_path / "bad.safetensors")
    assert compat.write_failure(caught.value) is None
    assert compat.write_failure(ValueError("no")) is None


def test_write_failure_of_a_safetensors_error_in_other_words_falls_back_to_its_cause_or_its_text():
    """A SafetensorError whose text names no errno (another safetensors release, a write error without one) is still
    a refused write: the OSError it came from says why, else its own first line does; one of reading stays None."""
    import errno

    from safetensors import SafetensorError

    unworded = SafetensorError("Error while serializing: I/O error: failed to write whole buffer\nmore detail")
    assert compat.write_failure(unworded) == "Error while serializing: I/O error: failed to write whole buffer"
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError as cause:
            raise SafetensorError("could not write the file") from cause
    except SafetensorError as err:
        chained = err
    assert compat.write_failure(chained) == os.strerror(errno.EDQUOT)
    assert compat.write_failure(SafetensorError("Error while deserializing header: invalid JSON")) is None
