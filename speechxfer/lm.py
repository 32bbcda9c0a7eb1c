"""n-gram language models for beam search: build an ARPA file from target-language text with KenLM's `lmplz`,
tune the LM weight and word score on a dev manifest, and the `lm:` stage of a recipe that does both after training
and leaves the LM in the model folder for `transcribe` and `evaluate`."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from speechxfer.atomic import TEMP_SUFFIX, atomic_write
from speechxfer.decoding import (DEFAULT_LM_WEIGHTS, DEFAULT_WORD_SCORES, BeamSearchDecoder, BeamSearchOptions,
                                 Decoder, GreedyDecoder, decode_batch, import_ctc_decoder)
from speechxfer.errors import InputError, Problem, SpeechxferError, counted, output_folder
from speechxfer.manifest import read_manifest
from speechxfer.recipe import Recipe
from speechxfer.scoring import ScoreReport, score
from speechxfer.text import TextNormalizer, TextRejected, normalized_references
from speechxfer.training import run_lock
from speechxfer.transcribe import AudioSegment, Recognizer, TranscribeOptions, emissions

LMPLZ_MISSING = (
    "KenLM's lmplz is not on PATH. In a speechxfer checkout, `bash scripts/install_kenlm.sh` builds it from the "
    "kenlm source package on PyPI into /usr/local/bin (PREFIX=DIR: into DIR/bin, then put that on PATH); it needs "
    "cmake, a C++ compiler, Boost program_options/system/thread/test and zlib (apt-get install cmake g++ "
    "libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev).")
# Inside a model folder, what the `lm:` stage of its recipe leaves: the folder, the ARPA model, the normalized text
# it was built from, and the tuned beam search settings (written last: a stage cut short leaves none).
LM_FOLDER = "lm"
LM_FILE = "lm.arpa"
LM_TEXT = "text.txt"
DECODER_SETTINGS = "decoder.json"
# The test set is scored with the LM by the same bootstrap as training's greedy test report.
TEST_BOOTSTRAP = 1000
# When the best LM weight or word score lies on an edge of the tuning grid, the grid grows past that edge by one
# step (the spacing of the last two values there), at most this many times.
GRID_EXTENSIONS = 3

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMBuild:
    """An ARPA model built from text."""

    path: Path
    order: int
    lines: int  # text lines the model was trained on
    words: int
    skipped: list[Problem]  # lines the normalizer rejected or left empty


def build_lm(text_path: str | os.PathLike, out_path: str | os.PathLike, *, order: int = 3,
             normalizer: Callable[[str], str]) -> LMBuild:
    """Normalize each line of a UTF-8 text file and train an `order`-gram ARPA model on it with `lmplz`.

    Raises SpeechxferError when lmplz is not on PATH or fails, InputError for an unreadable or empty text.
    """
    if shutil.which("lmplz") is None:  # before reading the text: that may take a while
        raise SpeechxferError(LMPLZ_MISSING)
    kept, skipped = read_lm_text(text_path, normalizer=normalizer)
    if not kept:
        raise InputError("no text left after normalization", path=text_path)
    write_arpa(kept, out_path, order=order)
    return LMBuild(Path(out_path), order, len(kept), sum(len(t.split()) for t in kept), skipped)


def read_lm_text(text_path: str | os.PathLike, *, normalizer: Callable[[str], str]) -> tuple[list[str], list[Problem]]:
    """The non-empty normalized lines of a UTF-8 text file, and a Problem for each line the normalizer rejects.
    InputError names the file (and line) when it cannot be read or is not UTF-8."""
    kept: list[str] = []
    skipped: list[Problem] = []
    try:
        with open(text_path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is no text
                except UnicodeDecodeError as err:
                    raise InputError(f"not UTF-8 text: byte 0x{raw[err.start]:02x} at column {err.start + 1} cannot "
                                     "be decoded", path=text_path, line=number) from None
                try:
                    normalized = normalizer(line)
                except TextRejected as err:
                    skipped.append(Problem(os.fspath(text_path), number, "rejected_text", str(err)))
                    continue
                if normalized.strip():
                    kept.append(normalized)
    except OSError as err:
        raise InputError(f"cannot read text: {err.strerror}", path=text_path) from None
    return kept, skipped


def write_arpa(lines: Sequence[str], out_path: str | os.PathLike, *, order: int) -> None:
    """Train an `order`-gram ARPA model on normalized lines with `lmplz` and write it to out_path (atomically: a
    failed or interrupted build leaves the previous file, or none)."""
    lmplz = shutil.which("lmplz")
    if lmplz is None:
        raise SpeechxferError(LMPLZ_MISSING)
    if order < 2:
        raise InputError(f"order must be at least 2 (KenLM needs bigrams), got {order}")
    out = Path(out_path)
    output_folder(out.parent)
    text = "\n".join(lines).encode("utf-8") + b"\n"
    with tempfile.TemporaryDirectory() as tmp, atomic_write(out, binary=True) as arpa:
        # --discount_fallback: the small corpora of low-resource languages lack the counts Kneser-Ney needs.
        command = [lmplz, "-o", str(order), "--discount_fallback", "-T", tmp, "-S", f"{_sort_memory_mib(text)}M"]
        done = subprocess.run(command, input=text, stdout=arpa, stderr=subprocess.PIPE)
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise SpeechxferError(f"lmplz failed (exit {done.returncode}): {' / '.join(tail)}")


def _sort_memory_mib(text: bytes) -> int:
    """Memory for lmplz's sorting, from the size of its text: by default lmplz takes 80% of physical memory and
    touches gigabytes of it even for a few lines (10 s for two lines on a 24 GB machine), beside a training that may
    still hold the machine. Less than the counts need only moves the sorting to disk (-T)."""
    physical_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return max(256, min(64 * len(text) // 2**20, physical_mib // 2))


@dataclass(frozen=True)
class TuneResult:
    """The best LM weight and word score on a dev set, and every point tried."""

    lm_weight: float
    word_score: float
    wer: float
    greedy_wer: float  # the same utterances without the LM
    grid: list[tuple[float, float, float]]  # (lm weight, word score, WER) in the order tried, extensions last
    utterances: int
    problems: list[Problem]
    left_out: list[Problem]  # utterances whose reference the normalizer rejects or empties (not scored)
    extended: list[str]  # what search_grid said about the grid's edges: each extension, and a best left on an edge


def tune_lm(recognizer: Recognizer, manifest_path: str | os.PathLike, *, lm_path: str,
            lexicon_path: str | None = None, lm_weights: Sequence[float] = DEFAULT_LM_WEIGHTS,
            word_scores: Sequence[float] = DEFAULT_WORD_SCORES, beam_size: int = 50,
            normalizer: TextNormalizer | None = None, options: TranscribeOptions = TranscribeOptions(),
            max_utterances: int | None = None, progress: bool = False) -> TuneResult:
    """Grid search of LM weight x word score by dev WER (search_grid: the grid grows past an edge that holds the
    best point); the model runs once, each point only decodes.

    Utterances whose audio fails are left out (listed in problems), and so are those whose reference the
    normalizer rejects or empties (listed in left_out; see text.normalized_references). max_utterances: only the
    first N rows of the manifest (as training's eval.max_dev_utterances). Ties go to the point tried first.
    """
    # Every point checked before the model runs: a bad value should not cost the pass over the audio.
    points = [BeamSearchOptions(lm_path, lexicon_path, beam_size, lm_weight, word_score)
              for lm_weight in lm_weights for word_score in word_scores]
    if not points:
        raise InputError("lm_weights and word_scores (--lm-weights, --word-scores) need at least one value each")
    for path in (lm_path, lexicon_path):
        if path is not None and not os.path.isfile(path):
            raise InputError("no such file", path=path)
    dev = manifest_emissions(recognizer, manifest_path, normalizer=normalizer, options=options,
                             max_utterances=max_utterances, progress=progress)

    def wer(decoder) -> float:
        return score(dev.references, dev.decode(decoder), normalizer=normalizer, bootstrap=0).wer

    greedy_wer = wer(GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s))

    def beam_wer(lm_weight: float, word_score: float) -> float:
        beam = BeamSearchOptions(lm_path, lexicon_path, beam_size, lm_weight, word_score)
        return wer(BeamSearchDecoder(recognizer.vocabulary, beam, frame_s=recognizer.frame_s))

    grid, extended = search_grid(beam_wer, lm_weights=lm_weights, word_scores=word_scores)
    best = min(grid, key=lambda point: point[2])
    return TuneResult(best[0], best[1], best[2], greedy_wer, grid, len(dev.log_probs), dev.problems, dev.left_out,
                      extended)


def search_grid(wer: Callable[[float, float], float], *, lm_weights: Sequence[float], word_scores: Sequence[float],
                extensions: int = GRID_EXTENSIONS) -> tuple[list[tuple[float, float, float]], list[str]]:
    """WER of every (LM weight, word score) of the grid, in order; then, while the points on an edge of the grid
    beat all the others, one step past that edge, at most `extensions` times: a step is the spacing of the two
    outermost values on that side, and the grid stays a full product. LM weights stay at or above 0 (no LM); a
    value given alone is the caller's choice and is never extended. Returns the points tried, as (lm weight,
    word score, WER), and a line for each extension and for a best point still on an edge after the last (each
    also logged).
    """
    grid: list[tuple[float, float, float]] = []
    tried: set[tuple[float, float]] = set()
    notes: list[str] = []

    def run(weights: Sequence[float], scores: Sequence[float]) -> None:
        for lm_weight in weights:
            for word_score in scores:
                if (lm_weight, word_score) not in tried:
                    tried.add((lm_weight, word_score))
                    grid.append((lm_weight, word_score, wer(lm_weight, word_score)))

    def past_edge(axis: int, *, floor: float | None) -> list[float]:
        """One step past the edge of this axis whose points beat all the others (strictly: a flat WER is no
        reason to go on), or nothing."""
        values = sorted({point[axis] for point in grid})
        if len(values) < 2:
            return []

        def best_wer(on_edge: bool, edge: float) -> float:
            return min((point[2] for point in grid if (point[axis] == edge) == on_edge), default=math.inf)

        if best_wer(True, values[-1]) < best_wer(False, values[-1]):
            return [values[-1] + values[-1] - values[-2]]
        if (floor is None or values[0] > floor) and best_wer(True, values[0]) < best_wer(False, values[0]):
            step = values[1] - values[0]
            return [values[0] - step if floor is None else max(floor, values[0] - step)]
        return []

    run(lm_weights, word_scores)
    for done in range(extensions + 1):
        best = min(grid, key=lambda point: point[2])
        new = {"LM weight": past_edge(0, floor=0.0), "word score": past_edge(1, floor=None)}
        if not any(new.values()):
            break
        where = " and ".join(f"{name} {value:g}" for name, value in (("LM weight", best[0]), ("word score", best[1]))
                             if new[name])
        if done == extensions:
            notes.append(f"the best point (WER {best[2]:.2%}) still lies on the grid's edge at {where} after "
                         f"{extensions} extensions: try values past it")
            logger.warning(f"lm: {notes[-1]}")
            break
        tries = ", ".join(f"{name} {v:g}" for name, values in new.items() for v in values)
        notes.append(f"the best point (WER {best[2]:.2%}) lies on the grid's edge at {where}: trying {tries}")
        logger.info(f"lm: {notes[-1]}")
        run(sorted({w for w, _, _ in grid}) + new["LM weight"], sorted({s for _, s, _ in grid}) + new["word score"])
    return grid, notes


@dataclass(frozen=True)
class ManifestEmissions:
    """A manifest's utterances run through the model once, to be decoded in several ways."""

    log_probs: dict[str, torch.Tensor]  # utterance id -> (frames, vocab) log posteriors
    references: dict[str, str]  # utterance id -> the manifest's text, for each utterance in log_probs
    problems: list[Problem]  # manifest rows skipped, and utterances whose audio failed (not scored)
    left_out: list[Problem]  # utterances whose reference the normalizer rejects or empties (not scored)

    def decode(self, decoder: Decoder) -> dict[str, str]:
        """{utterance id: hypothesis} of every utterance."""
        return {i: decode_batch(decoder, lp[None], torch.tensor([len(lp)]))[0].text for i, lp in self.log_probs.items()}


def manifest_emissions(recognizer: Recognizer, manifest_path: str | os.PathLike, *,
                       normalizer: Callable[[str], str] | None = None,
                       options: TranscribeOptions = TranscribeOptions(), max_utterances: int | None = None,
                       progress: bool = False) -> ManifestEmissions:
    """Log posteriors of the manifest's (first max_utterances) usable utterances; InputError when none is left."""
    utterances, problems = read_manifest(manifest_path)
    utterances = utterances[:max_utterances]
    references, left_out = normalized_references(utterances, normalizer)
    utterances = [u for u in utterances if u.id in references]
    segments = [AudioSegment(u.id, u.audio_path, u.duration_s, u.offset_s, name=u.id) for u in utterances]
    cached: dict[str, torch.Tensor] = {}
    for event in emissions(recognizer, segments, options=options, progress=progress):
        if isinstance(event, Problem):
            problems.append(event)
        else:
            cached[event[0].id] = event[1]
    if not cached:
        raise InputError("no utterance of the manifest could be transcribed", path=manifest_path)
    return ManifestEmissions(cached, {u.id: u.text for u in utterances if u.id in cached}, problems, left_out)


# --- the `lm:` stage of a recipe -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LMText:
    """The normalized lines a recipe's LM is built from, and where they came from."""

    lines: list[str]
    text_lines: int  # lines of lm.texts kept by the normalizer
    train_lines: int  # train transcripts the normalizer kept
    held_out_text: int  # lines of lm.texts equal to a dev or test transcript, dropped
    held_out_train: int  # train transcripts equal to a dev or test transcript, dropped
    skipped: list[Problem]  # lines of lm.texts the normalizer rejects


def recipe_lm_text(recipe: Recipe, *, normalizer: Callable[[str], str]) -> LMText:
    """recipe.lm.texts and the train transcripts, normalized; lines equal to a dev or test transcript (compared
    after normalization, whitespace collapsed) are dropped, so that the LM never saw what it is tuned or scored on."""
    texts: list[str] = []
    skipped: list[Problem] = []
    for path in recipe.lm.texts:
        lines, problems = read_lm_text(path, normalizer=normalizer)
        texts += lines
        skipped += problems
    train = list(normalized_references(read_manifest(recipe.data.train)[0], normalizer)[0].values())
    held_out: set[str] = set()
    for path in (recipe.data.dev, recipe.data.test):
        if path is not None and Path(path).exists():  # a prepared corpus may lack a split
            held_out |= {_words(t) for t in normalized_references(read_manifest(path)[0], normalizer)[0].values()}
    kept_texts = [line for line in texts if _words(line) not in held_out]
    kept_train = [line for line in train if _words(line) not in held_out]
    return LMText(kept_texts + kept_train, len(texts), len(train), len(texts) - len(kept_texts),
                  len(train) - len(kept_train), skipped)


def _words(line: str) -> str:
    return " ".join(line.split())


def missing_lm_tools() -> str | None:
    """Why an LM cannot be built or decoded with here (no lmplz, no flashlight-text), or None."""
    if shutil.which("lmplz") is None:
        return "KenLM's lmplz is not on PATH (`bash scripts/install_kenlm.sh` builds it)"
    try:
        import_ctc_decoder()
    except SpeechxferError as err:
        return str(err)
    return None


def check_lm_stage(recipe: Recipe) -> None:
    """Before training: InputError for a file of lm.texts that cannot be read as UTF-8 text, and a warning when
    the tools of the LM stage are missing, so that neither is found out only after the training."""
    if recipe.lm is None:
        return
    normalizer = TextNormalizer(recipe.text)
    for path in recipe.lm.texts:
        read_lm_text(path, normalizer=normalizer)
    missing = missing_lm_tools()
    if missing is not None:
        logger.warning(f"lm: {missing}: no language model will be built after training, and the test report "
                       "will be greedy only")


@dataclass(frozen=True)
class LMStage:
    """What the `lm:` stage built in the model folder and measured."""

    folder: Path  # OUTPUT_DIR/lm
    text: LMText
    beam: BeamSearchOptions  # the tuned settings, as load_decoder_settings gives them
    tune: TuneResult | None  # None without a dev set: beam then holds BeamSearchOptions' default weights
    test: ScoreReport | None  # the test set decoded with the LM; None without a test set
    test_greedy: ScoreReport | None  # the same pass over the test audio decoded greedily


def lm_stage(recipe: Recipe, *, device: str = "auto", progress: bool = False) -> LMStage | None:
    """After train(recipe), with the run folder locked as training locks it (so no second train of the folder starts
    meanwhile): build the LM of recipe.lm into OUTPUT_DIR/lm/ (lm.arpa, and text.txt that it is built
    from), tune LM weight and word score on dev with the trained model, score the test set with it (adding "lm" to
    test_report.json, whose greedy keys stay as training wrote them), and save the tuned settings in
    lm/decoder.json, which `transcribe` and `evaluate` of the folder then use by default (load_decoder_settings).

    Returns None, having written nothing, without an `lm:` section, on any process but the main one, and when
    lmplz or flashlight-text is missing (logged). Each run redoes the whole stage; decoder.json goes first and is
    written last, so a stage cut short leaves the folder decoding greedily, and the greedy report untouched.
    """
    if recipe.lm is None or not PartialState().is_main_process:
        return None
    missing = missing_lm_tools()
    if missing is not None:
        logger.warning(f"lm: {missing}: no language model built; the test report is greedy only")
        return None
    with run_lock(recipe.output_dir):
        return _lm_stage(recipe, device=device, progress=progress)


def _lm_stage(recipe: Recipe, *, device: str, progress: bool) -> LMStage:
    options = recipe.lm
    out = Path(recipe.output_dir)
    folder = out / LM_FOLDER
    folder.mkdir(exist_ok=True)
    (folder / DECODER_SETTINGS).unlink(missing_ok=True)  # tuned for an earlier model or LM; never kept past a redo
    for temp in folder.glob(f".*{TEMP_SUFFIX}"):  # what atomic_write left when a kill cut the stage short
        temp.unlink()
    normalizer = TextNormalizer(recipe.text)

    text = recipe_lm_text(recipe, normalizer=normalizer)
    if text.skipped:
        logger.info(f"lm: {counted(len(text.skipped), 'line')} of lm.texts rejected by the normalizer, e.g. "
                    f"{text.skipped[0]}")
    if not text.lines:
        raise InputError("no text for the language model: lm.texts and the train transcripts are empty after "
                         "normalization and leaving out the dev and test transcripts", path=recipe.data.train)
    logger.info(f"lm: {counted(text.held_out_text + text.held_out_train, 'line')} equal to a dev or test transcript "
                f"left out ({text.held_out_text} of lm.texts, {text.held_out_train} train transcripts)")
    with atomic_write(folder / LM_TEXT) as f:
        f.write("".join(line + "\n" for line in text.lines))
    write_arpa(text.lines, folder / LM_FILE, order=options.order)
    logger.info(f"lm: {options.order}-gram model from {counted(len(text.lines), 'line')} "
                f"({text.text_lines - text.held_out_text} of lm.texts, {text.train_lines - text.held_out_train} train "
                f"transcripts) -> {folder / LM_FILE}")

    recognizer = Recognizer(out, device=device)
    beam = BeamSearchOptions(str(folder / LM_FILE), None, options.beam_size)
    tune = None
    dev = recipe.data.dev
    if dev is not None and Path(dev).exists():
        tune = tune_lm(recognizer, dev, lm_path=beam.lm_path, lm_weights=options.weights,
                       word_scores=options.word_scores, beam_size=options.beam_size, normalizer=normalizer,
                       max_utterances=recipe.eval.max_dev_utterances, progress=progress)
        beam = BeamSearchOptions(beam.lm_path, None, options.beam_size, tune.lm_weight, tune.word_score)
        logger.info(f"lm: tuned on {tune.utterances} dev utterances: LM weight {tune.lm_weight:g}, word score "
                    f"{tune.word_score:g}: dev WER {tune.wer:.2%} (greedy {tune.greedy_wer:.2%})")
    else:
        logger.info(f"lm: no dev set to tune on: LM weight {beam.lm_weight:g}, word score {beam.word_score:g} "
                    "(beam search's defaults)")
    settings = {"lm_path": LM_FILE, "lexicon_path": None, "beam_size": beam.beam_size, "lm_weight": beam.lm_weight,
                "word_score": beam.word_score, "order": options.order,
                "dev_utterances": None if tune is None else tune.utterances,
                "dev_wer": None if tune is None else tune.wer,
                "dev_greedy_wer": None if tune is None else tune.greedy_wer}

    with_lm = greedy = None
    test = recipe.data.test
    if test is not None and Path(test).exists():
        emitted = manifest_emissions(recognizer, test, normalizer=normalizer, progress=progress)
        decoder = BeamSearchDecoder(recognizer.vocabulary, beam, frame_s=recognizer.frame_s)
        with_lm = score(emitted.references, emitted.decode(decoder), normalizer=normalizer, bootstrap=TEST_BOOTSTRAP)
        greedy = score(emitted.references, emitted.decode(GreedyDecoder(recognizer.vocabulary,
                                                                        frame_s=recognizer.frame_s)),
                       normalizer=normalizer, bootstrap=0)
        report_path = out / "test_report.json"
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
        report["lm"] = {**with_lm.to_dict(), "decoder": settings, "greedy": {"wer": greedy.wer, "cer": greedy.cer}}
        with atomic_write(report_path) as f:
            f.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        logger.info(f"test with the LM: WER {with_lm.wer:.2%}, CER {with_lm.cer:.2%} "
                    f"({counted(with_lm.sentences, 'utterance')}; greedy on the same pass {greedy.wer:.2%} / "
                    f"{greedy.cer:.2%})")
    with atomic_write(folder / DECODER_SETTINGS) as f:  # last: the stage is complete
        f.write(json.dumps(settings, indent=2) + "\n")
    return LMStage(folder, text, beam, tune, with_lm, greedy)


def load_decoder_settings(model: str | os.PathLike) -> BeamSearchOptions | None:
    """The beam search settings the `lm:` stage saved in a model folder (MODEL/lm/decoder.json), paths made
    absolute; None when it has none (a hub id has none)."""
    path = Path(model).expanduser() / LM_FOLDER / DECODER_SETTINGS
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        lexicon = None if saved["lexicon_path"] is None else str(path.parent / saved["lexicon_path"])
        return BeamSearchOptions(str(path.parent / saved["lm_path"]), lexicon, saved["beam_size"], saved["lm_weight"],
                                 saved["word_score"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"unreadable decoder settings ({type(err).__name__}: {err})", path=path) from None

