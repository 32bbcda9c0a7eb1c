"""The `speechxfer` command: parses arguments and calls library functions, nothing more.

Each subcommand has an `_add_<name>(subparsers)` that declares its arguments and a `_cmd_<name>(args) -> int`
that calls the library. Errors derived from SpeechxferError become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

from speechxfer.compat import check_transformers_version
from speechxfer.errors import SpeechxferError, counted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechxfer",
        description="Cross-lingual speech recognition adaptation for wav2vec2 checkpoints.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


class _CommandParser(argparse.ArgumentParser):
    """The parser of one subcommand. A command that runs a model declares its arguments with `declare_later`: their
    defaults come from modules that import torch (10-20 s on a loaded machine), which then load only when that
    command is parsed, never for `speechxfer --help` or `speechxfer wer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._declare: list[Callable[[argparse.ArgumentParser], None]] = []

    def declare_later(self, declare: Callable[[argparse.ArgumentParser], None]) -> None:
        self._declare.append(declare)

    def parse_known_args(self, args=None, namespace=None):
        while self._declare:
            self._declare.pop(0)(self)
        return super().parse_known_args(args, namespace)


def _whole_number(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


# --- subcommands (each helper block: _add_X declares arguments, _cmd_X calls the library) -------------------


def _add_synth(subparsers) -> None:
    p = subparsers.add_parser("synth", help="speak sentences with espeak-ng into a 16 kHz FLAC corpus (GPL-3 extra)",
                              description="Speak each sentence with a random espeak-ng voice variant, speed and pitch; "
                                          "write OUTDIR/audio/*.flac and OUTDIR/{train,dev,test}.jsonl.")
    p.add_argument("language", metavar="LANG", help="espeak-ng voice, usually an ISO 639-1 code (de, fr, pt)")
    p.add_argument("sentences", metavar="SENTENCES_FILE", help="UTF-8 text, one sentence per line")
    p.add_argument("out_dir", metavar="OUTDIR")
    p.add_argument("--count", type=_whole_number(1), default=None, help="speak only the first N distinct sentences")
    p.add_argument("--seed", type=int, default=0, help="voices, noise and split (default 0)")
    p.add_argument("--jobs", type=_whole_number(1), default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--noise-snr-db", type=float, default=None, help="add white noise at this SNR (default none)")
    p.add_argument("--dev-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from speechxfer.synth import build_corpus, read_sentences

    corpus = build_corpus(args.language, read_sentences(args.sentences), args.out_dir, count=args.count,
                          seed=args.seed, jobs=args.jobs, noise_snr_db=args.noise_snr_db,
                          dev_fraction=args.dev_fraction, test_fraction=args.test_fraction)
    for problem in corpus.problems:
        print(problem, file=sys.stderr)
    for name, utterances in corpus.splits.items():
        hours = sum(u.duration_s for u in utterances) / 3600
        print(f"{name}: {counted(len(utterances), 'utterance')}, {hours:.2f} h -> "
              f"{os.path.join(args.out_dir, name + '.jsonl')}")
    return 0


def _add_prepare(subparsers) -> None:
    from dataclasses import fields

    from speechxfer.prepare import FORMATS, Columns

    p = subparsers.add_parser("prepare", help="convert a corpus into JSONL manifests, one per split",
                              description="Read a corpus, check every row (audio file, header, transcript, id) and "
                                          "write OUTDIR/<split>.jsonl, OUTDIR/summary.json and OUTDIR/problems.txt. "
                                          "Bad rows are reported and skipped.")
    p.add_argument("format", metavar="FORMAT", choices=FORMATS,
                   help="source layout: " + ", ".join(FORMATS))
    p.add_argument("source", metavar="SOURCE",
                   help="corpus folder or file (asterisk: a sounds folder or a language code such as es)")
    p.add_argument("out_dir", metavar="OUTDIR")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any row had a problem")
    p.add_argument("--split", default=None, help="split name when SOURCE holds a single one")
    p.add_argument("--splits", default=None, type=lambda v: [s for s in v.split(",") if s],
                   help="comma-separated splits to import (commonvoice default: train,dev,test)")
    p.add_argument("--language", default=None, help="language code for rows whose source gives none")
    for field in fields(Columns):
        p.add_argument(f"--{field.name}-column", default=None, metavar="NAME",
                       help=f"{field.name} column (csv, tsv, audiofolder)")
    p.add_argument("--show-problems", type=_whole_number(0), default=20, metavar="N",
                   help="print the first N problems (default 20)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    from dataclasses import fields

    from speechxfer.errors import InputError
    from speechxfer.prepare import Columns, prepare

    named = {field.name: getattr(args, f"{field.name}_column") for field in fields(Columns)}
    columns = Columns(**named) if any(named.values()) else None
    result = prepare(args.format, args.source, args.out_dir, columns=columns, split=args.split, splits=args.splits,
                     language=args.language)
    for problem in result.problems[: args.show_problems]:
        print(problem, file=sys.stderr)
    hidden = len(result.problems) - args.show_problems
    if hidden > 0 and args.show_problems > 0:
        print(f"... and {hidden} more problems", file=sys.stderr)
    if result.problems:
        print(f"{counted(len(result.problems), 'problem')}; all listed in {os.path.join(args.out_dir, 'problems.txt')}",
              file=sys.stderr)
    for name, summary in result.summaries.items():
        print(f"{name}: {summary} -> {result.manifests[name]}")
    if result.utterances == 0:
        raise InputError(f"no usable utterances ({counted(len(result.problems), 'problem')})", path=args.source)
    if args.strict and result.problems:
        raise InputError(f"{counted(len(result.problems), 'row')} had problems and --strict is set", path=args.source)
    return 0


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a wav2vec2 checkpoint with a new CTC head from a recipe",
                              description="Train as RECIPE (YAML) says and write a Hugging Face model folder, with "
                                          "metrics, curves and the test report, to its output_dir.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe file, e.g. recipes/common_voice/tr.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (value read as YAML), e.g. --set train.lr=1e-4; repeatable")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir/last/ (a finished run: redo "
                                                          "the test report and the recipe's LM stage)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from speechxfer.lm import check_lm_stage, lm_stage
    from speechxfer.ranking import resolve_init_from
    from speechxfer.recipe import load_recipe
    from speechxfer.training import train

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    check_lm_stage(recipe)
    recipe = resolve_init_from(recipe, resume=args.resume, progress=sys.stderr.isatty())
    result = train(recipe, resume=args.resume)
    if result.best_dev_wer is not None:
        print(f"best dev WER {result.best_dev_wer:.2%} at update {result.best_update} of {result.updates}"
              + (" (stopped early)" if result.stopped_early else ""))
    if result.test_wer is not None:
        print(f"test WER {result.test_wer:.2%}, CER {result.test_cer:.2%}", flush=True)
    stage = lm_stage(recipe, progress=sys.stderr.isatty())
    if stage is not None and stage.test is not None:
        print(f"test WER with the LM {stage.test.wer:.2%}, CER {stage.test.cer:.2%} (LM weight "
              f"{stage.beam.lm_weight:g}, word score {stage.beam.word_score:g})")
    print(f"model: {result.output_dir}" + ("" if stage is None else f" (with its LM in {stage.folder})"))
    return 0


def _add_wer(subparsers) -> None:
    from speechxfer.scoring import FORMATS
    from speechxfer.text import PRESETS

    p = subparsers.add_parser("wer", help="word and character error rates of hypotheses, as NIST sclite counts them",
                              description="Score HYP against REF: WER, CER, substitutions/deletions/insertions/hits, "
                                          "sentence error rate and a bootstrap 95% confidence interval. Files with "
                                          "ids (Kaldi `id text`, TSV with id and text columns, JSONL) pair by id; "
                                          "two plain files pair by line.")
    p.add_argument("ref", metavar="REF", help="reference transcripts")
    p.add_argument("hyp", metavar="HYP", help="hypothesis transcripts")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="how to read both files (default auto: jsonl, tsv with a header, kaldi ids, else lines)")
    p.add_argument("--normalize", metavar="PRESET_OR_YAML", default=None,
                   help=f"normalize both sides: a preset ({', '.join(PRESETS)}) or a YAML file with a `text:` "
                        "section (default: compare as written, split on whitespace)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score the ids both sides have, as sclite does, instead of stopping at missing ids")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--per-utterance", metavar="FILE.tsv", default=None, help="write one row per utterance")
    p.add_argument("--worst", type=_whole_number(0), default=0, metavar="N",
                   help="show the N worst utterances with alignments")
    p.add_argument("--bootstrap", type=_whole_number(0), default=1000, metavar="N",
                   help="resamples for the confidence interval (default 1000; 0 skips it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.set_defaults(func=_cmd_wer)


def _cmd_wer(args) -> int:
    import json

    from speechxfer.scoring import (format_report, read_pair, render_alignment, score, worst_utterances,
                                    write_per_utterance_tsv)
    from speechxfer.text import TextNormalizer, load_text_options

    normalizer = None if args.normalize is None else TextNormalizer(load_text_options(args.normalize))
    refs, hyps, ref_format, hyp_format = read_pair(args.ref, args.hyp, ref_format=args.format,
                                                   hyp_format=args.format)
    report = score(refs, hyps, normalizer=normalizer, allow_missing=args.allow_missing,
                   bootstrap=args.bootstrap, seed=args.seed)
    if args.per_utterance:
        write_per_utterance_tsv(report, args.per_utterance)
    worst = worst_utterances(report, args.worst)
    if args.json:
        summary = report.to_dict() | {"ref_format": ref_format, "hyp_format": hyp_format}
        if worst:
            summary["worst"] = [{"id": u.id, "wer": u.wer, "errors": u.words.errors,
                                 "alignment": render_alignment(u.words, u.reference, u.hypothesis).splitlines()}
                                for u in worst]
        print(json.dumps(summary, ensure_ascii=False, indent=1))
        return 0
    print(f"{len(refs)} references ({ref_format}), {len(hyps)} hypotheses ({hyp_format})")
    print(format_report(report))
    for u in worst:
        print(f"\n{u.id}: WER {u.wer:.2%} ({counted(u.words.errors, 'error')} / {counted(u.ref_words, 'word')})")
        print(render_alignment(u.words, u.reference, u.hypothesis))
    return 0


def _add_vocab(subparsers) -> None:
    from speechxfer.text import PRESETS

    p = subparsers.add_parser("vocab", help="build the CTC vocabulary from a training manifest and audit dev/test",
                              description="Normalize the training texts, write OUTDIR/vocab.json and the tokenizer "
                                          "files (loadable by Wav2Vec2CTCTokenizer), and OUTDIR/charset_audit.json "
                                          "listing characters of dev/test that train never shows.")
    p.add_argument("train", metavar="TRAIN_MANIFEST", help="JSONL manifest of the training split")
    p.add_argument("out_dir", metavar="OUTDIR")
    p.add_argument("--dev", metavar="MANIFEST", default=None, help="dev manifest to audit")
    p.add_argument("--test", metavar="MANIFEST", default=None, help="test manifest to audit")
    p.add_argument("--normalize", metavar="PRESET_OR_YAML", default="basic",
                   help=f"a preset ({', '.join(PRESETS)}) or a YAML file with a `text:` section (default basic)")
    p.set_defaults(func=_cmd_vocab)


def _cmd_vocab(args) -> int:
    from speechxfer.text import TextNormalizer, load_text_options
    from speechxfer.vocabulary import vocabulary_from_manifests

    others = {name: path for name, path in (("dev", args.dev), ("test", args.test)) if path is not None}
    vocabulary, audit, problems = vocabulary_from_manifests(
        args.train, normalizer=TextNormalizer(load_text_options(args.normalize)), others=others)
    for problem in problems:
        print(problem, file=sys.stderr)
    vocabulary.save(args.out_dir)
    audit.save(os.path.join(args.out_dir, "charset_audit.json"))
    print(f"{len(vocabulary)} tokens -> {os.path.join(args.out_dir, 'vocab.json')}")
    print(audit.format_table())
    return 0


def _add_model_arguments(p) -> None:
    """How transcribe, evaluate and lm tune run the model."""
    from speechxfer.transcribe import COMPUTE_DTYPES, TranscribeOptions

    defaults = TranscribeOptions()
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto (default: the best available)")
    p.add_argument("--lang", default=None, metavar="LANG",
                   help="for a model with language adapters (adapter.LANG.safetensors), the language to use "
                        "(default: the one in model.safetensors)")
    p.add_argument("--dtype", choices=tuple(COMPUTE_DTYPES), default="float32",
                   help="precision of matrix products and convolutions (default float32; bfloat16 is faster on "
                        "CPUs with AVX512-BF16 or AMX, float16 on GPUs)")
    p.add_argument("--max-batch-s", type=float, default=defaults.max_batch_s, metavar="S",
                   help=f"padded seconds of audio per forward pass (default {defaults.max_batch_s:g})")
    p.add_argument("--chunk-s", type=float, default=defaults.chunk_s, metavar="S",
                   help=f"audio longer than this is read in windows of this length (default {defaults.chunk_s:g})")
    p.add_argument("--stride-s", type=float, default=defaults.stride_s, metavar="S",
                   help=f"context on each side of a window, dropped after the model (default {defaults.stride_s:g})")
    p.add_argument("--silence-dbfs", type=_level_or_off, default=defaults.silence_dbfs, metavar="DB",
                   help="a file or utterance whose level (RMS) is below this many dBFS is silent: an empty transcript, "
                        f"not run through the model (default {defaults.silence_dbfs:g}; off: run all audio)")


def _level_or_off(text: str) -> float | None:
    """An argparse type: a level in dBFS, or None for `off`."""
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a level in dBFS (such as -70) or off, got {text!r}") from None


def _add_beam_arguments(p, *, tuning: bool = False) -> None:
    """Beam search with an n-gram LM (transcribe, evaluate: the model folder's own LM by default; lm tune)."""
    from speechxfer.decoding import BeamSearchOptions

    if tuning:
        p.add_argument("--lm", metavar="FILE", required=True,
                       help="n-gram LM (ARPA, or KenLM binary with --lexicon) for beam search")
    else:
        choice = p.add_mutually_exclusive_group()
        choice.add_argument("--lm", metavar="FILE", default=None,
                            help="n-gram LM (ARPA, or KenLM binary with --lexicon) for beam search; default: the LM "
                                 "in the model folder's lm/ (a recipe's lm: section puts it there) with its tuned "
                                 "settings, else greedy decoding")
        choice.add_argument("--no-lm", action="store_true", help="greedy decoding, even when the model has an LM")
    p.add_argument("--lexicon", metavar="FILE", default=None,
                   help="lines `word<TAB>l e t t e r s`; default: the words of the ARPA file's unigrams")
    # Without --lm these default to the model's tuned values (None: not given), with it to beam search's.
    p.add_argument("--beam-size", type=int, default=BeamSearchOptions.beam_size if tuning else None, metavar="N",
                   help=f"hypotheses kept per frame (default {BeamSearchOptions.beam_size}"
                        + ("" if tuning else ", or the model LM's") + ")")
    if not tuning:
        p.add_argument("--lm-weight", type=float, default=None,
                       help=f"weight of the LM score (default {BeamSearchOptions.lm_weight:g}, or the model LM's "
                            "tuned one; `lm tune` finds one)")
        p.add_argument("--word-score", type=float, default=None,
                       help=f"score added per word (default {BeamSearchOptions.word_score:g}, or the model LM's "
                            "tuned one)")


def _load_recognizer(args, ranks=None):
    from transformers.utils import logging as transformers_logging

    from speechxfer.transcribe import Recognizer

    transformers_logging.disable_progress_bar()  # keep stderr for our own progress and problems
    device = args.device if ranks is None else ranks.device(args.device)
    return Recognizer(args.model, device=device, dtype=args.dtype, lang=args.lang)


def _transcribe_options(args):
    from speechxfer.transcribe import TranscribeOptions

    return TranscribeOptions(max_batch_s=args.max_batch_s, chunk_s=args.chunk_s, stride_s=args.stride_s,
                             silence_dbfs=args.silence_dbfs)


# The flags that set how an LM decodes (_add_beam_arguments), as (flag, BeamSearchOptions field); each flag's
# argparse attribute is its field's name without "_path".
_BEAM_FLAGS = (("--lexicon", "lexicon_path"), ("--beam-size", "beam_size"), ("--lm-weight", "lm_weight"),
               ("--word-score", "word_score"))


def _given_beam_flags(args) -> dict[str, tuple[str, object]]:
    """The _BEAM_FLAGS given on the command line: BeamSearchOptions field -> (flag, value)."""
    given = {field: (flag, getattr(args, field.removesuffix("_path"))) for flag, field in _BEAM_FLAGS}
    return {field: pair for field, pair in given.items() if pair[1] is not None}


def _beam_options(args, *, model: str | None = None):
    """Beam search options, or None for greedy decoding; built before the model loads, so that bad values stop
    the command at once. Without --lm (and --no-lm): the LM of the `model` folder with its tuned settings, if it
    has one; options given on the command line override those."""
    import dataclasses

    from speechxfer.decoding import BeamSearchOptions
    from speechxfer.lm import LM_FOLDER, load_decoder_settings

    given = {field: value for field, (_, value) in _given_beam_flags(args).items()}
    if args.lm is not None:
        return BeamSearchOptions(args.lm, **given)
    own = None if args.no_lm or model is None else load_decoder_settings(model)
    if own is None:
        return None
    beam = dataclasses.replace(own, **given)
    print(f"decoding with the model's language model {os.path.join(model, LM_FOLDER)} (LM weight "
          f"{beam.lm_weight:g}, word score {beam.word_score:g}, beam {beam.beam_size}); --no-lm decodes greedily",
          file=sys.stderr)
    return beam


def _decoder(beam, recognizer):
    from speechxfer.decoding import make_decoder

    decoder = make_decoder(recognizer.vocabulary, frame_s=recognizer.frame_s, beam=beam)
    if getattr(decoder, "skipped_words", 0):
        print(f"lexicon: {counted(decoder.lexicon_size, 'word')}; {decoder.skipped_words} LM words skipped (characters "
              "outside the model's vocabulary)", file=sys.stderr)
    return decoder


def _add_transcribe(subparsers) -> None:
    p = subparsers.add_parser("transcribe", help="transcribe audio files, folders or globs with a CTC model",
                              description="Transcribe audio (any format and rate; long files in overlapping windows) "
                                          "with a Wav2Vec2ForCTC model folder or hub id. Prints `path<TAB>text` as "
                                          "each file finishes (in both fields backslash, tab, newline and carriage "
                                          "return are written \\\\, \\t, \\n, \\r, as in transcripts.tsv); with "
                                          "--output-dir also writes one file per format. A rerun into the same "
                                          "--output-dir skips the files whose outputs are all there. Under `torchrun "
                                          "--nproc_per_node N` (several machines: a shared --output-dir) each process "
                                          "transcribes its share and rank 0 writes the merged transcripts.tsv.")
    p.declare_later(_transcribe_arguments)
    p.set_defaults(func=_cmd_transcribe)


def _transcribe_arguments(p) -> None:
    from speechxfer.transcribe import OUTPUT_FORMATS

    p.add_argument("model", metavar="MODEL", help="model folder, hub id, or folder written by `speechxfer export`")
    p.add_argument("paths", metavar="PATH", nargs="+", help="audio files, folders or glob patterns")
    p.add_argument("--recursive", action="store_true", help="search folders (and ** globs) recursively")
    p.add_argument("--output-dir", metavar="DIR", default=None,
                   help="write NAME.txt/.json/.srt/.vtt per file, and a row `path<TAB>text` per file to "
                        "DIR/transcripts.tsv (kept across runs; escaped as printed)")
    p.add_argument("--overwrite", action="store_true",
                   help="transcribe again the files whose outputs are already in --output-dir")
    p.add_argument("--format", default=",".join(OUTPUT_FORMATS), metavar="LIST",
                   help=f"comma-separated output formats for --output-dir (default {','.join(OUTPUT_FORMATS)})")
    _add_model_arguments(p)
    _add_beam_arguments(p)


def _cmd_transcribe(args) -> int:
    from speechxfer.errors import InputError, Problem
    from speechxfer.transcribe import OutputWriter, Ranks, find_audio, transcribe, tsv_escape

    options, beam = _transcribe_options(args), _beam_options(args, model=args.model)
    ranks = Ranks.from_environment()
    writer = None
    if args.output_dir is not None:
        writer = OutputWriter(args.output_dir, [f.strip() for f in args.format.split(",") if f.strip()],
                              overwrite=args.overwrite, ranks=ranks)
    segments, problems = find_audio(args.paths, recursive=args.recursive)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not segments:
        raise InputError("no audio to transcribe")
    todo = segments if writer is None else writer.unfinished(segments)
    skipped = len(segments) - len(todo)
    if skipped:
        print(f"{skipped} of {counted(len(segments), 'file')} already transcribed in {args.output_dir}, skipped "
              "(--overwrite transcribes them again)", file=sys.stderr)
    done = attempted = 0
    try:
        if todo:
            recognizer = _load_recognizer(args, ranks)
            decoder = _decoder(beam, recognizer)
            for result in transcribe(recognizer, todo, decoder=decoder, options=options,
                                     progress=sys.stderr.isatty(), ranks=ranks):
                attempted += 1
                if isinstance(result, Problem):
                    print(result, file=sys.stderr)
                    continue
                print(f"{tsv_escape(result.segment.id)}\t{tsv_escape(result.transcript.text)}", flush=True)
                if writer is not None:
                    writer.write(result)
                done += 1
    finally:
        if writer is not None:
            writer.close(segments)
    if ranks.world_size > 1:
        print(f"process {ranks.rank} of {ranks.world_size}: transcribed {done} of the {attempted} inputs of its "
              "share", file=sys.stderr)
        return 0 if done or not attempted else 1  # a share may be empty
    print(f"transcribed {done} of {len(todo) + len(problems)} inputs"
          + (f" ({skipped} done before)" if skipped else ""), file=sys.stderr)
    return 0 if done or skipped else 1


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="transcribe a manifest and report WER/CER",
                              description="Transcribe every utterance of a JSONL manifest, write hypotheses.jsonl "
                                          "(which `speechxfer wer MANIFEST` scores to the same numbers), score.json, "
                                          "per_utterance.tsv and report.md. Under `torchrun --nproc_per_node N` each "
                                          "process transcribes its share and rank 0 scores.")
    p.declare_later(_evaluate_arguments)
    p.set_defaults(func=_cmd_evaluate)


def _evaluate_arguments(p) -> None:
    from speechxfer.text import PRESETS

    p.add_argument("model", metavar="MODEL", help="model folder, hub id, or folder written by `speechxfer export`")
    p.add_argument("manifest", metavar="MANIFEST", help="JSONL manifest with reference texts")
    p.add_argument("--output-dir", metavar="DIR", default="evaluation", help="where to write (default ./evaluation)")
    p.add_argument("--normalize", metavar="PRESET_OR_YAML", default=None,
                   help=f"normalize references and hypotheses: a preset ({', '.join(PRESETS)}) or a YAML file with a "
                        "`text:` section (default: the model folder's recipe.yaml when it has one, else none)")
    _add_model_arguments(p)
    _add_beam_arguments(p)


def _cmd_evaluate(args) -> int:
    from speechxfer.errors import output_folder
    from speechxfer.evaluate import describe_left_out, evaluate, model_normalization
    from speechxfer.scoring import format_report
    from speechxfer.text import TextNormalizer, load_text_options
    from speechxfer.transcribe import Ranks

    options, beam = _transcribe_options(args), _beam_options(args, model=args.model)
    output_folder(args.output_dir)  # a bad output folder stops the command before the model loads
    ranks = Ranks.from_environment()
    recognizer = _load_recognizer(args, ranks)
    spec = args.normalize if args.normalize is not None else model_normalization(recognizer.directory, lang=args.lang)
    normalizer = None if spec is None else TextNormalizer(load_text_options(spec))
    result = evaluate(recognizer, args.manifest, output_dir=args.output_dir, decoder=_decoder(beam, recognizer),
                      normalizer=normalizer, options=options, progress=sys.stderr.isatty(), ranks=ranks)
    if result is None:  # a process other than rank 0, which reports
        return 0
    for problem in result.problems + result.left_out:
        print(problem, file=sys.stderr)
    print(f"normalization: {spec or 'none'}")
    if result.left_out:
        print(describe_left_out(result.left_out))
    print(format_report(result.report))
    for ref, hyp, count in result.substitutions[:5]:
        print(f"  {count:>4}  {ref} -> {hyp}")
    print(f"hypotheses: {result.hypotheses_path}; report: {result.output_dir / 'report.md'}")
    return 0


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model for CPU inference (ONNX, optionally int8)",
                              description="Write the model's network as ONNX for onnxruntime (the export extra), with "
                                          "its vocabulary, settings, recipe and LM, into a new folder that "
                                          "`transcribe` and `evaluate` take in place of the model folder. The export "
                                          "is checked against the model; export.json records how closely it matches.")
    p.declare_later(_export_arguments)
    p.set_defaults(func=_cmd_export)


def _export_arguments(p) -> None:
    from speechxfer.export import QUANTIZATIONS

    p.add_argument("model", metavar="MODEL", help="model folder or hub id")
    p.add_argument("output_dir", metavar="OUT", help="new (or empty) folder to write")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="the only format: onnx")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="int8: matrix-product weights in int8, activations quantized per batch (faster on a CPU; "
                        "check the WER with `speechxfer evaluate`)")
    p.add_argument("--lang", default=None, metavar="LANG",
                   help="for a model with language adapters, the language to export (default: the one in "
                        "model.safetensors)")


def _cmd_export(args) -> int:
    from transformers.utils import logging as transformers_logging

    from speechxfer.export import export_model

    transformers_logging.disable_progress_bar()
    export_model(args.model, args.output_dir, quantize=args.quantize, lang=args.lang)  # it logs what it wrote
    return 0


def _add_lm(subparsers) -> None:
    from speechxfer.text import PRESETS

    p = subparsers.add_parser("lm", help="n-gram language models for beam search: build one, tune its weights",
                              description="Build an ARPA n-gram model with KenLM's lmplz, or grid-search the LM weight "
                                          "and word score of beam search on a dev manifest.")
    actions = p.add_subparsers(dest="lm_action", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="normalize a text file and build an ARPA model with lmplz")
    b.add_argument("text", metavar="TEXT", help="UTF-8 text, one sentence per line")
    b.add_argument("out", metavar="OUT", help="ARPA file to write")
    b.add_argument("--order", type=int, default=3, help="n-gram order (default 3)")
    b.add_argument("--normalize", metavar="PRESET_OR_YAML", default="basic",
                   help=f"a preset ({', '.join(PRESETS)}) or a YAML file with a `text:` section, the model's "
                        "recipe.yaml for instance (default basic)")
    b.set_defaults(func=_cmd_lm_build)
    t = actions.add_parser("tune", help="grid-search LM weight and word score on a dev manifest")
    t.declare_later(_lm_tune_arguments)
    t.set_defaults(func=_cmd_lm_tune)


def _lm_tune_arguments(t) -> None:
    from speechxfer.decoding import DEFAULT_LM_WEIGHTS, DEFAULT_WORD_SCORES

    t.add_argument("model", metavar="MODEL", help="model folder or hub id")
    t.add_argument("manifest", metavar="DEV_MANIFEST", help="JSONL manifest of the dev split")
    _add_beam_arguments(t, tuning=True)
    t.add_argument("--lm-weights", default=",".join(map(str, DEFAULT_LM_WEIGHTS)), metavar="LIST",
                   help="comma-separated LM weights to try")
    t.add_argument("--word-scores", default=",".join(map(str, DEFAULT_WORD_SCORES)), metavar="LIST",
                   help="comma-separated word scores to try (write --word-scores=-1,0 when the list starts negative)")
    t.add_argument("--normalize", metavar="PRESET_OR_YAML", default=None,
                   help="normalize both sides before scoring (default: the model folder's recipe.yaml when it has "
                        "one, else none)")
    _add_model_arguments(t)


def _cmd_lm_build(args) -> int:
    from speechxfer.lm import build_lm
    from speechxfer.text import TextNormalizer, load_text_options

    built = build_lm(args.text, args.out, order=args.order,
                     normalizer=TextNormalizer(load_text_options(args.normalize)))
    for problem in built.skipped:
        print(problem, file=sys.stderr)
    print(f"{built.order}-gram ARPA model from {counted(built.lines, 'line')}, {counted(built.words, 'word')} -> "
          f"{built.path}")
    return 0


def _cmd_lm_tune(args) -> int:
    from speechxfer.errors import InputError
    from speechxfer.evaluate import describe_left_out, model_normalization
    from speechxfer.lm import tune_lm
    from speechxfer.text import TextNormalizer, load_text_options

    def floats(text: str, option: str) -> list[float]:
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"{option} takes comma-separated numbers, got {text!r}") from None

    lm_weights, word_scores = floats(args.lm_weights, "--lm-weights"), floats(args.word_scores, "--word-scores")
    options = _transcribe_options(args)
    recognizer = _load_recognizer(args)
    spec = args.normalize if args.normalize is not None else model_normalization(recognizer.directory, lang=args.lang)
    result = tune_lm(recognizer, args.manifest, lm_path=args.lm, lexicon_path=args.lexicon, lm_weights=lm_weights,
                     word_scores=word_scores, beam_size=args.beam_size,
                     normalizer=None if spec is None else TextNormalizer(load_text_options(spec)),
                     options=options, progress=sys.stderr.isatty())
    for problem in result.problems + result.left_out:
        print(problem, file=sys.stderr)
    print(f"{counted(result.utterances, 'utterance')}, normalization: {spec or 'none'}")
    if result.left_out:
        print(describe_left_out(result.left_out))
    print("lm_weight\tword_score\tWER")
    for lm_weight, word_score, wer in result.grid:
        print(f"{lm_weight:g}\t{word_score:g}\t{wer:.2%}")
    print(f"best: --lm-weight {result.lm_weight:g} --word-score {result.word_score:g} (WER {result.wer:.2%}; "
          f"greedy {result.greedy_wer:.2%})")
    return 0


def _add_pseudo_label(subparsers) -> None:
    p = subparsers.add_parser("pseudo-label", help="transcribe untranscribed audio into a pseudo-labelled manifest",
                              description="Transcribe audio with a teacher model and write a JSONL manifest whose rows "
                                          "carry `pseudo_label: true` and the teacher's confidence, for a recipe's "
                                          "data.pseudo_labelled. Texts are normalized as the model's recipe.yaml "
                                          "says; rows below --min-confidence, empty ones, silent ones (--silence-dbfs) "
                                          "and ones with characters outside the model's vocabulary are left out and "
                                          "counted.")
    p.declare_later(_pseudo_label_arguments)
    p.set_defaults(func=_cmd_pseudo_label)


def _pseudo_label_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="teacher model folder or hub id")
    p.add_argument("paths", metavar="AUDIO", nargs="+", help="audio files, folders (searched recursively) or globs")
    p.add_argument("--output", metavar="OUT.jsonl", required=True, help="manifest to write")
    p.add_argument("--min-confidence", type=float, default=None, metavar="X",
                   help="leave out rows below this confidence: greedy, the mean top posterior of the non-blank frames "
                        "(0-1); with --lm, the beam score per frame (log domain, at most 0 with --word-score 0). "
                        "Default: keep all")
    _add_model_arguments(p)
    _add_beam_arguments(p)


def _cmd_pseudo_label(args) -> int:
    from speechxfer.errors import InputError
    from speechxfer.evaluate import model_normalization
    from speechxfer.selftrain import pseudo_label
    from speechxfer.text import TextNormalizer, load_text_options
    from speechxfer.transcribe import find_audio

    options, beam = _transcribe_options(args), _beam_options(args, model=args.model)
    segments, problems = find_audio(args.paths, recursive=True)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not segments:
        raise InputError("no audio to pseudo-label")
    recognizer = _load_recognizer(args)
    spec = model_normalization(recognizer.directory)
    labels = pseudo_label(recognizer, segments, output=args.output, decoder=_decoder(beam, recognizer),
                          normalizer=None if spec is None else TextNormalizer(load_text_options(spec)),
                          min_confidence=args.min_confidence, options=options, progress=sys.stderr.isatty())
    for problem in labels.problems:
        print(problem, file=sys.stderr)
    dropped = ", ".join(f"{n} {kind}" for kind, n in sorted(labels.dropped.items()))
    print(f"{labels.kept} of {counted(len(segments), 'file')} pseudo-labelled -> {labels.manifest}"
          + (f"; left out {dropped}" if dropped else ""))
    return 0


def _add_self_train(subparsers) -> None:
    p = subparsers.add_parser("self-train", help="self-training rounds: teacher -> pseudo labels -> student",
                              description="Train the recipe's model (round 0, the teacher), then for each round "
                                          "pseudo-label the untranscribed audio with the best model so far (with its "
                                          "own LM, from the recipe's lm: section, unless --lm or --no-lm says "
                                          "otherwise) and train a student on the recipe's data plus those labels; a "
                                          "round is kept only if its dev WER improves. Each round's model gets the "
                                          "recipe's LM stage, as `train` gives it. Writes OUTPUT_DIR/round-K/ and "
                                          "OUTPUT_DIR/self_train.json; a rerun continues after the last finished "
                                          "round.")
    p.declare_later(_self_train_arguments)
    p.set_defaults(func=_cmd_self_train)


def _self_train_arguments(p) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="recipe file (needs data.dev)")
    p.add_argument("--unlabelled", metavar="DIR", nargs="+", required=True,
                   help="untranscribed audio: files, folders (searched recursively) or globs; never dev or test audio")
    p.add_argument("--rounds", type=_whole_number(1), default=1, metavar="K", help="student rounds (default 1)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="X",
                   help="leave out pseudo labels below this confidence (see pseudo-label; default: keep all)")
    p.add_argument("--max-share", type=float, default=0.5, metavar="X",
                   help="most of each epoch's seconds the pseudo-labelled audio may hold (default 0.5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (value read as YAML); repeatable")
    _add_model_arguments(p)
    _add_beam_arguments(p)


def _cmd_self_train(args) -> int:
    from speechxfer.errors import InputError
    from speechxfer.recipe import load_recipe
    from speechxfer.selftrain import self_train

    given = [flag for flag, _ in _given_beam_flags(args).values()]
    if given and args.lm is None:
        # each round's teacher is trained in the run, so its own LM's settings are its tuned ones
        raise InputError(f"{', '.join(given)} set how --lm FILE decodes; without --lm each teacher decodes with its "
                         "own LM and the weights tuned for it (or greedily with --no-lm)")
    result = self_train(load_recipe(args.recipe, overrides=args.overrides), unlabelled=args.unlabelled,
                        rounds=args.rounds, min_confidence=args.min_confidence, max_share=args.max_share,
                        beam=_beam_options(args), teacher_lm=not args.no_lm, options=_transcribe_options(args),
                        device=args.device, dtype=args.dtype)
    for r in result.rounds:
        print(f"round {r.round}: dev WER {r.dev_wer:.2%}"
              + ("" if r.test_wer is None else f", test WER {r.test_wer:.2%}")
              + ("" if r.test_wer_lm is None else f" ({r.test_wer_lm:.2%} with its LM)")
              + ("" if r.round == 0 else f", {r.pseudo_labels} pseudo labels, {'kept' if r.kept else 'discarded'}"))
    if result.stopped:
        print(f"stopped: {result.stopped}")
    print(f"best: round {result.best.round}, model {result.best.model}")
    return 0




def _add_rank_sources(subparsers) -> None:
    p = subparsers.add_parser("rank-sources", help="rank candidate source checkpoints by zero-shot CER on dev",
                              description="Transcribe the first N usable utterances of the dev manifest (in manifest "
                                          "order) with each candidate's own CTC head (each language of an adapter "
                                          "model), read its letters back into the target's through the vocabulary "
                                          "transfer (same letter, base letter, transliteration), and print the "
                                          "candidates best first. Candidates that cannot be scored are listed last "
                                          "with the reason.")
    p.declare_later(_rank_sources_arguments)
    p.set_defaults(func=_cmd_rank_sources)


def _rank_sources_arguments(p) -> None:
    from speechxfer.text import PRESETS

    p.add_argument("candidates", metavar="CANDIDATE", nargs="+", help="model folders or hub ids")
    p.add_argument("--dev", metavar="DEV_MANIFEST", required=True, help="JSONL manifest of the target's dev split")
    p.add_argument("--n", type=_whole_number(1), default=50, help="dev utterances to score (default 50)")
    p.add_argument("--normalize", metavar="PRESET_OR_YAML", default="basic",
                   help=f"normalize references and hypotheses: a preset ({', '.join(PRESETS)}) or a YAML file with "
                        "a `text:` section, the target recipe for instance (default basic)")
    p.add_argument("--languages", metavar="LIST", default=None,
                   help="comma-separated adapter languages to score in adapter models (default: all they have)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the ranking to FILE as JSON")
    _add_model_arguments(p)


def _cmd_rank_sources(args) -> int:
    from transformers.utils import logging as transformers_logging

    from speechxfer.errors import InputError
    from speechxfer.ranking import format_ranking, rank_sources, write_ranking
    from speechxfer.text import load_text_options

    languages = None
    if args.languages is not None:
        languages = [language.strip() for language in args.languages.split(",") if language.strip()]
        if not languages:
            raise InputError(f"--languages takes comma-separated language codes, got {args.languages!r}")
    # Checked before any model runs, so that a mistyped path does not cost the ranking.
    if args.json is not None and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(args.json) or ".")):
        raise InputError("--json must name a file in an existing folder", path=args.json)
    options, text_options = _transcribe_options(args), load_text_options(args.normalize)
    transformers_logging.disable_progress_bar()  # keep stderr for our own progress and problems
    scores = rank_sources(args.candidates, args.dev, n=args.n, text_options=text_options, languages=languages,
                          device=args.device, dtype=args.dtype, options=options, progress=sys.stderr.isatty())
    print(format_ranking(scores))
    if args.json is not None:
        write_ranking(args.json, scores, dev=args.dev, n=args.n, normalize=args.normalize)
    return 0 if any(s.cer is not None for s in scores) else 1


_SUBCOMMANDS: list = [_add_synth, _add_prepare, _add_train, _add_wer, _add_vocab, _add_transcribe, _add_evaluate,
                      _add_export, _add_lm, _add_pseudo_label, _add_self_train, _add_rank_sources]


class _MessageHandler(logging.Handler):
    """Prints a log message on stderr as plain text (INFO bare, higher levels after their name), through
    tqdm.write so that a progress bar on the terminal stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            message = record.getMessage()
            if record.levelno > logging.INFO:
                message = f"{record.levelname.lower()}: {message}"
            tqdm.write(message, file=sys.stderr)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def messages_to_stderr() -> Iterator[None]:
    """Print the library's messages (logger "speechxfer", INFO and up) on stderr while the block runs."""
    package_logger = logging.getLogger("speechxfer")
    handler, level = _MessageHandler(), package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_transformers_version()
        with messages_to_stderr():
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # inside the try: a reader gone away (`| head`) is met here, not at exit
            return code
    except SpeechxferError as err:
        print(f"speechxfer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Whoever read the output stopped reading (`speechxfer wer ... | head`): stop quietly, as cat and grep do.
        # Output still buffered would fail again at exit, so stdout goes to devnull (Python's signal docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        if err.filename is None:
            raise
        # The file system refusing one file (a folder where a file goes, no permission, a full disk) is the user's
        # to fix, not a bug: one line that names it.
        print(f"speechxfer {args.command}: error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"speechxfer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
