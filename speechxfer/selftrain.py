"""Self-training on untranscribed audio: a teacher model transcribes it into a pseudo-labelled manifest, a student
trains on the labelled data plus those pseudo labels, and the better of the two teaches the next round.

`pseudo_label` writes the manifest (rows keep their audio path and duration, so `prepare` and `train` take it
like any other, and carry `pseudo_label: true` and the teacher's confidence). `self_train` runs the rounds of a
recipe; the student of each round starts from the recipe's own `base` (or `model_config`), as a noisy student
does, with the teacher's vocabulary, and it is kept only when its dev WER is lower than its teacher's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from speechxfer.atomic import atomic_write
from speechxfer.decoding import BeamSearchOptions, Decoder, make_decoder
from speechxfer.errors import InputError, Problem, output_folder
from speechxfer.lm import check_lm_stage, lm_stage, load_decoder_settings
from speechxfer.manifest import Utterance, check_held_out, read_manifest, write_manifest
from speechxfer.recipe import PseudoLabelledOptions, Recipe
from speechxfer.text import TextNormalizer, TextRejected
from speechxfer.training import train
from speechxfer.transcribe import AudioSegment, Recognizer, TranscribeOptions, Transcription, find_audio, transcribe

SUMMARY_NAME = "self_train.json"
# Before each pseudo-labelled id (the file's name): a file named like a corpus utterance must not take its id (the
# Asterisk prompt packages of two dialects, say, share their prompt names).
ID_PREFIX = "pseudo/"
PSEUDO_LABELS_NAME = "pseudo_labels.jsonl"
# Beside it: how the labels were decoded and what was left out, for the summary of a rerun that finds them made
LABELLING_NAME = "labelling.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoLabels:
    """What pseudo_label wrote, and what it left out."""

    manifest: Path
    kept: int  # rows written
    # rows left out, by kind: low_confidence, empty_text (nothing decoded, or nothing left after normalization),
    # silent (audio below TranscribeOptions.silence_dbfs, never decoded), rejected_text (the normalizer refuses it),
    # unknown_characters (outside the model's vocabulary)
    dropped: dict[str, int]
    problems: list[Problem]  # audio that could not be transcribed, and each dropped row


def pseudo_label(recognizer: Recognizer, segments: Sequence[AudioSegment], *, output: str | os.PathLike,
                 decoder: Decoder, normalizer: Callable[[str], str] | None = None,
                 min_confidence: float | None = None, options: TranscribeOptions = TranscribeOptions(),
                 progress: bool = False) -> PseudoLabels:
    """Transcribe `segments` with the teacher and write the transcripts as a pseudo-labelled manifest.

    Each row: id (ID_PREFIX + the segment's name), audio_path, duration_s, offset_s, the normalized text,
    `pseudo_label: true`, and `confidence` (decoding.Transcript.confidence: greedy, the mean top posterior of the
    non-blank frames in [0, 1]; with an LM, the beam's score per frame). Left out, counted and listed as Problems:
    rows below `min_confidence`, empty transcripts, silent audio (below `options.silence_dbfs`), texts the
    normalizer rejects or empties, and texts with characters outside the model's vocabulary (or its unknown
    token). The manifest is written atomically once all is done.
    """
    # Before any audio is decoded, so that hours of it are not transcribed for a manifest that cannot be written
    if Path(output).is_dir():
        raise InputError("is a folder: the pseudo-labelled manifest to write is a file (OUT.jsonl)", path=output)
    output_folder(Path(output).parent)
    vocabulary = recognizer.vocabulary
    letters = set(vocabulary.tokens) - {vocabulary.blank, vocabulary.unk, vocabulary.delimiter}
    rows: list[Utterance] = []
    problems: list[Problem] = []
    dropped: Counter[str] = Counter()
    for result in transcribe(recognizer, segments, decoder=decoder, options=options, progress=progress):
        if not isinstance(result, Transcription):
            problems.append(result)
            continue
        segment, transcript = result.segment, result.transcript
        if result.silent_dbfs is not None:
            dropped["silent"] += 1
            problems.append(Problem(segment.path, None, "silent", f"{result.silent_dbfs:.1f} dBFS, below "
                                    f"{options.silence_dbfs:g} dBFS: not transcribed", ID_PREFIX + segment.name))
            continue
        kind, text = _pseudo_text(transcript.text, normalizer, letters, unk=vocabulary.unk)
        if kind is None and min_confidence is not None and transcript.confidence < min_confidence:
            kind = "low_confidence"
        if kind is not None:
            dropped[kind] += 1
            problems.append(Problem(segment.path, None, kind, f"{transcript.text!r} (confidence "
                                    f"{transcript.confidence:.4g})", ID_PREFIX + segment.name))
            continue
        rows.append(Utterance(id=ID_PREFIX + segment.name, audio_path=segment.path, text=text,
                              duration_s=segment.duration_s, offset_s=segment.offset_s, pseudo_label=True,
                              confidence=transcript.confidence))
    order = {ID_PREFIX + s.name: i for i, s in enumerate(segments)}  # transcribe yields by length; write in input order
    rows.sort(key=lambda u: order[u.id])
    write_manifest(output, rows)
    return PseudoLabels(Path(output), len(rows), dict(dropped), problems)


def _pseudo_text(text: str, normalizer: Callable[[str], str] | None, letters: set[str], *,
                 unk: str) -> tuple[str | None, str]:
    """(kind of problem or None, normalized text) of a teacher's transcript."""
    if unk in text:  # decode_ctc spells the unknown token out; normalized, it would pass for letters
        return "unknown_characters", text
    try:
        normalized = text if normalizer is None else normalizer(text)
    except TextRejected:
        return "rejected_text", text
    if not normalized.strip():
        return "empty_text", normalized
    if set(normalized.replace(" ", "")) - letters:
        return "unknown_characters", normalized
    return None, normalized


@dataclass(frozen=True)
class Round:
    """One round of self-training, as recorded in OUT/self_train.json."""

    round: int  # 0: the teacher, trained on the labelled data alone
    model: str  # the round's model folder (OUT/round-K/model)
    dev_wer: float  # of its best checkpoint (training's greedy dev decoding)
    test_wer: float | None  # greedy, as training's test report has it
    kept: bool  # round 0 always; a student only when its dev WER is below that of its teacher
    teacher: str | None = None  # the model that pseudo-labelled this round's audio
    pseudo_labels: int = 0  # rows of the round's pseudo-labelled manifest
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # pseudo labels left out, by kind
    # test WER with the round's own LM (the recipe's lm: section, built and tuned on dev after its training);
    # None without an lm: section, a test set or the LM tools
    test_wer_lm: float | None = None
    # how this round's pseudo labels were decoded: "greedy", or the LM file (the teacher's own, or --lm)
    labelled_with: str | None = None


@dataclass(frozen=True)
class SelfTrainResult:
    rounds: list[Round]
    stopped: str | None  # why fewer rounds than asked ran, or None

    @property
    def best(self) -> Round:
        """The last kept round: its model is the best by dev WER."""
        return [r for r in self.rounds if r.kept][-1]


def self_train(recipe: Recipe, *, unlabelled: Sequence[str], rounds: int, min_confidence: float | None = None,
               max_share: float = 0.5, beam: BeamSearchOptions | None = None, teacher_lm: bool = True,
               options: TranscribeOptions = TranscribeOptions(), device: str = "auto",
               dtype: str = "float32") -> SelfTrainResult:
    """Round 0 trains the teacher as `recipe` says; rounds 1..`rounds` each pseudo-label the audio of
    `unlabelled` (files, folders searched recursively, globs) with the best model so far and train a student on
    recipe's data plus those labels (a data.pseudo_labelled entry capped at `max_share` of each epoch).

    Everything goes under recipe.output_dir (OUT): OUT/round-K/model (a train() output folder),
    OUT/round-K/pseudo_labels.jsonl, and OUT/self_train.json (every finished round, rewritten after each). A round
    is kept only if its dev WER is below its teacher's; a discarded round ends the run, since the next one would
    have the same teacher, labels and seed and so repeat it. A rerun continues after the last finished round (and
    resumes an interrupted training). InputError without a dev set, or when unlabelled audio is also dev or test
    audio. With an `lm:` section, every round's model gets its LM stage after training (lm.lm_stage: the LM built,
    its weights tuned on dev, the test set scored with it), as `speechxfer train` does.

    How the teacher transcribes: `beam` (an LM of the caller's), else with teacher_lm the teacher's own LM and tuned
    weights when its folder has them (an LM's labels are far better than greedy ones where greedy WER is high),
    else greedily; `options`, `device` and `dtype` as in `speechxfer transcribe`.
    """
    if rounds < 1:
        raise InputError(f"rounds (--rounds) must be at least 1, got {rounds}")
    if not 0 < max_share <= 1:
        raise InputError(f"max_share (--max-share) must be in (0, 1], got {max_share:g}")
    if recipe.data.dev is None:
        raise InputError("self-training keeps a round only when dev WER improves: the recipe needs data.dev")
    check_lm_stage(recipe)  # unreadable lm.texts stop the run before the first training
    out = Path(recipe.output_dir)
    summary_path = out / SUMMARY_NAME
    done = _read_summary(summary_path)
    segments, problems = find_audio(unlabelled, recursive=True)
    if not segments:
        # A mistyped path, one line naming it: not that the audio it does not hold is missing.
        for problem in problems:
            if problem.path in unlabelled and not os.path.exists(problem.path):
                raise InputError(f"{problem.message} (--unlabelled)", path=problem.path)
    for problem in problems:
        logger.warning(f"unlabelled: {problem}")
    if not segments:
        raise InputError(f"no audio to pseudo-label in {', '.join(unlabelled)}")
    held_out = {split: read_manifest(path)[0] for split in ("dev", "test")
                if (path := getattr(recipe.data, split)) is not None and Path(path).exists()}
    # Before any training: unlabelled audio that is also dev or test audio would be refused by the first student.
    check_held_out([Utterance(id=ID_PREFIX + s.name, audio_path=s.path, text="", duration_s=s.duration_s,
                              manifest=s.path) for s in segments], held_out)
    normalizer = TextNormalizer(recipe.text)
    if not done:
        done.append(_train_round(recipe, out, 0, device=device))
        logger.info(f"round 0 (teacher): dev WER {done[0].dev_wer:.2%}")
        _write_summary(summary_path, done, None)
    for k in range(len(done), rounds + 1):
        if not done[-1].kept:
            stopped = (f"round {done[-1].round} did not improve dev WER ({done[-1].dev_wer:.2%}); the next round would "
                       "repeat it")
            logger.info(stopped)
            return _write_summary(summary_path, done, stopped)
        teacher = [r for r in done if r.kept][-1]
        folder = out / f"round-{k}"
        labels_path = folder / PSEUDO_LABELS_NAME
        labelling_path = folder / LABELLING_NAME
        if labels_path.exists():  # written atomically, so a file there is a finished labelling
            labelled_with, dropped = _read_labelling(labelling_path)
        else:
            round_beam = beam if beam is not None or not teacher_lm else load_decoder_settings(teacher.model)
            labelled_with = "greedy" if round_beam is None else round_beam.lm_path
            recognizer = Recognizer(teacher.model, device=device, dtype=dtype)
            decoder = make_decoder(recognizer.vocabulary, frame_s=recognizer.frame_s, beam=round_beam)
            labels = pseudo_label(recognizer, segments, output=labels_path, decoder=decoder, normalizer=normalizer,
                                  min_confidence=min_confidence, options=options)
            dropped = labels.dropped
            logger.info(f"round {k}: {labels.kept} pseudo labels from {teacher.model}"
                        + ("" if round_beam is None else f" with the LM {round_beam.lm_path} (LM weight "
                           f"{round_beam.lm_weight:g}, word score {round_beam.word_score:g})")
                        + (f"; left out {', '.join(f'{n} {kind}' for kind, n in sorted(dropped.items()))}"
                           if dropped else "") + f" -> {labels_path}")
            with atomic_write(labelling_path) as f:
                json.dump({"labelled_with": labelled_with, "dropped": dropped}, f, indent=1)
        student = dataclasses.replace(recipe, data=dataclasses.replace(
            recipe.data, pseudo_labelled=recipe.data.pseudo_labelled + (
                PseudoLabelledOptions(manifest=str(labels_path), max_share=max_share),)))
        if recipe.vocabulary.path is None:  # the teacher's letters are the pseudo labels' letters
            student = dataclasses.replace(student, vocabulary=dataclasses.replace(recipe.vocabulary,
                                                                                  path=done[0].model))
        result = _train_round(student, out, k, device=device)
        done.append(dataclasses.replace(result, kept=result.dev_wer < teacher.dev_wer, teacher=teacher.model,
                                        pseudo_labels=len(read_manifest(labels_path)[0]), dropped=dropped,
                                        labelled_with=labelled_with))
        logger.info(f"round {k}: dev WER {result.dev_wer:.2%} against {teacher.dev_wer:.2%} of round {teacher.round}: "
                    + ("kept" if done[-1].kept else "discarded"))
        _write_summary(summary_path, done, None)
    return SelfTrainResult(done, None)


def _train_round(recipe: Recipe, out: Path, k: int, *, device: str) -> Round:
    """Train (or resume) round k into OUT/round-k/model, then its LM stage (none without an lm: section)."""
    model = out / f"round-{k}" / "model"
    recipe = dataclasses.replace(recipe, output_dir=str(model))
    result = train(recipe, resume=(model / "last").exists())
    if result.best_dev_wer is None:
        raise InputError("no dev utterance could be scored, so no round can be judged", path=recipe.data.dev)
    stage = lm_stage(recipe, device=device)
    return Round(round=k, model=str(model), dev_wer=result.best_dev_wer, test_wer=result.test_wer, kept=True,
                 test_wer_lm=None if stage is None or stage.test is None else stage.test.wer)


def _read_labelling(path: Path) -> tuple[str | None, dict[str, int]]:
    """(labelled_with, dropped) of a round's labelling.json, as an earlier run wrote it beside its pseudo labels;
    (None, {}) where there is none to read (a kill between the two writes, or a file made by hand)."""
    try:
        labelling = json.loads(path.read_text(encoding="utf-8"))
        return labelling["labelled_with"], dict(labelling["dropped"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}


def _read_summary(path: Path) -> list[Round]:
    if not path.exists():
        return []
    try:
        return [Round(**r) for r in json.loads(path.read_text(encoding="utf-8"))["rounds"]]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"not a self-training summary ({err}): move it away to start over", path=path) from None


def _write_summary(path: Path, rounds: list[Round], stopped: str | None) -> SelfTrainResult:
    result = SelfTrainResult(rounds, stopped)
    output_folder(path.parent)
    with atomic_write(path) as f:
        f.write(json.dumps({"rounds": [dataclasses.asdict(r) for r in rounds], "best_round": result.best.round,
                            "stopped": stopped}, ensure_ascii=False, indent=1) + "\n")
    return result
