"""Pick the best source checkpoint for a new language: the zero-shot character error rate of each candidate (and of
each language of an adapter model) on the first dev utterances, its output read back into the target's characters.

Reading back is the vocabulary transfer of model surgery run the other way: where surgery.find_source_tokens
starts a target character's CTC row from a source token (the same letter, its base letter, or the tokens of its
transliteration), a candidate's emission of that token (or token sequence) reads as that target character. A
source that already writes the target's letters, or letters the transfer maps onto them, scores a low CER, and its
head rows are the ones fine-tuning starts from.

A recipe's `adapt.init_from: auto` runs the same ranking before training (resolve_init_from) and starts from the
top row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from speechxfer.atomic import atomic_write
from speechxfer.errors import InputError, Problem, SpeechxferError, counted
from speechxfer.manifest import read_manifest
from speechxfer.recipe import Recipe
from speechxfer.scoring import score
from speechxfer.surgery import adapter_languages, find_source_tokens
from speechxfer.text import TextNormalizer, TextOptions, normalized_references
from speechxfer.training import prepare_run
from speechxfer.transcribe import AudioSegment, Recognizer, TranscribeOptions, emissions, model_directory
from speechxfer.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

RANKING_FILE = "source_ranking.json"  # in a run folder: the ranking that adapt.init_from auto started from

# Which relation a source token reads back through when several target characters map onto it: the same letter
# first, then a base letter (é and è both start from e), then a transliteration; among equals the character
# the dev texts use most.
_PREFERENCE = {"shared": 0, "base_letter": 1, "transliterated": 2}


@dataclass(frozen=True)
class SourceScore:
    """One candidate checkpoint (one language of an adapter model) scored zero-shot on the dev utterances."""

    candidate: str  # as given
    language: str | None  # adapter language of an MMS-style model; None for a checkpoint with one CTC head
    cer: float | None  # character error rate (a fraction, counted as `sclite -c`); None when not scored
    utterances: int  # dev utterances scored (those whose audio failed count, with an empty hypothesis)
    seconds: float  # wall-clock time of loading (the model, or the language's adapter) and transcribing
    mapped: int  # characters of the dev texts the source can write (same letter, base letter, transliteration)
    characters: int  # distinct characters of the dev texts (spaces not counted)
    error: str | None = None  # why the candidate could not be scored (one line); such rows rank last

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ReadBack:
    """How a source vocabulary's tokens read as target text: token sequences that spell a target character."""

    spellings: dict[tuple[str, ...], str]  # source tokens -> target character
    mapped: int  # target characters reachable from some source token(s)
    characters: int  # target characters in all

    def __call__(self, tokens: Sequence[str]) -> str:
        """The target text of emitted source tokens (" " for the word delimiter): longest spelling first, tokens
        that spell no target character kept as they are (a wrong letter stays an error)."""
        longest = max((len(key) for key in self.spellings), default=1)
        out = []
        i = 0
        while i < len(tokens):
            for k in range(min(longest, len(tokens) - i), 0, -1):
                target = self.spellings.get(tuple(tokens[i: i + k]))
                if target is not None:
                    out.append(target)
                    i += k
                    break
            else:
                out.append(tokens[i])
                i += 1
        return " ".join("".join(out).split())


def read_back_table(target_chars: Mapping[str, int], source: Vocabulary) -> ReadBack:
    """The reverse of the row transfer from `source` onto a vocabulary of `target_chars` (character -> count in
    the dev texts). Only the source's letters take part: its blank, unknown and word-delimiter tokens, and
    control tokens such as <s>, never spell a target character."""
    letters = {token: i for i, token in enumerate(source.tokens) if not _is_control(token, source)}
    best: dict[tuple[str, ...], tuple[int, int, str]] = {}
    mapped = 0
    for char, count in target_chars.items():
        found = find_source_tokens(char, letters)
        if found is None:
            continue
        mapped += 1
        how, tokens = found
        rank = (_PREFERENCE[how], -count, char)
        key = tuple(tokens)
        if key not in best or rank < best[key]:
            best[key] = rank
    return ReadBack({key: rank[2] for key, rank in best.items()}, mapped, len(target_chars))


def _is_control(token: str, vocabulary: Vocabulary) -> bool:
    """Special tokens of the source, including <s>, </s> and the like, which no speech spells."""
    if token in (vocabulary.blank, vocabulary.unk, vocabulary.delimiter):
        return True
    return len(token) > 2 and (token[0], token[-1]) in (("<", ">"), ("[", "]"))


def rank_sources(candidates: Sequence[str | os.PathLike], dev_manifest: str | os.PathLike, *, n: int = 50,
                 text_options: TextOptions = TextOptions(), languages: Sequence[str] | None = None,
                 device: str = "auto", dtype: str = "float32", options: TranscribeOptions = TranscribeOptions(),
                 progress: bool = False) -> list[SourceScore]:
    """Score each candidate checkpoint (folder or hub id) zero-shot on the first `n` usable utterances of the dev
    manifest, in manifest order, and rank them: lowest CER first (ties keep the order given), then the candidates
    that could not be scored, in the order given, each with its one-line reason.

    An MMS-style adapter model (adapter.<lang>.safetensors files beside its weights) gives one row per language,
    all of them or those of `languages`. Greedy CTC decoding of the candidate's own head; each output is read back
    into target characters (see ReadBack), then references and hypotheses are normalized with `text_options`
    (hypotheses without the alphabet check: a letter outside it is an error, not a reason to stop). Manifest rows
    left out and audio that fails are logged as warnings; failed audio scores as an empty hypothesis.
    InputError when the manifest holds no usable utterance or `n` is below 1.
    """
    if n < 1:
        raise InputError(f"n (--n) must be at least 1, got {n}")
    utterances, problems = read_manifest(dev_manifest)
    normalizer = TextNormalizer(text_options)
    references, left_out = normalized_references(utterances, normalizer)
    for problem in problems + left_out:
        logger.warning("%s", problem)
    chosen = [u for u in utterances if u.id in references][:n]
    if not chosen:
        raise InputError(f"no usable utterance in the dev manifest ({len(problems)} bad rows, {len(left_out)} "
                         "references the normalizer rejects or empties)", path=dev_manifest)
    references = {u.id: references[u.id] for u in chosen}
    target_chars = Counter(c for text in references.values() for c in text if c != " ")
    segments = [AudioSegment(u.id, u.audio_path, u.duration_s, u.offset_s, name=u.id) for u in chosen]
    # A hypothesis is normalized like the references except that nothing in it is refused: digits or letters
    # outside the alphabet are errors the CER counts.
    digits = "keep" if text_options.digits == "reject" else text_options.digits
    hypothesis_normalizer = TextNormalizer(dataclasses.replace(text_options, alphabet=None, digits=digits))
    job = _Job(segments, references, target_chars, hypothesis_normalizer, options, progress, set())
    scores = []
    for candidate in candidates:
        scores += _score_candidate(os.fspath(candidate), job, languages=languages, device=device, dtype=dtype)
    return sorted(scores, key=lambda s: (s.cer is None, s.cer or 0.0))


@dataclass(frozen=True)
class _Job:
    """What every candidate is scored on."""

    segments: list[AudioSegment]
    references: dict[str, str]  # utterance id -> normalized reference
    target_chars: Counter[str]
    normalizer: TextNormalizer  # for hypotheses
    options: TranscribeOptions
    progress: bool
    reported: set[tuple[str | None, str]]  # audio problems already logged (each is logged once, not once per candidate)


def _score_candidate(candidate: str, job: _Job, *, languages: Sequence[str] | None, device: str,
                     dtype: str) -> list[SourceScore]:
    """The rows of one candidate: one, or one per adapter language. The model loads once; a language whose
    adapter fails gets its row with the reason, and the next one is tried."""
    start = time.perf_counter()
    try:
        directory = model_directory(candidate)
        found = adapter_languages(directory)
    except SpeechxferError as err:
        return [_failed(candidate, None, err, start, job)]
    wanted: list[str | None] = list(found if languages is None else languages) if found else [None]
    rows = []
    recognizer = None
    for language in wanted:
        try:
            if recognizer is None:
                recognizer = Recognizer(directory, device=device, dtype=dtype, lang=language)
            elif language is not None:
                recognizer.use_adapter(language)
            rows.append(_zero_shot(candidate, recognizer, job, start))
        except SpeechxferError as err:
            rows.append(_failed(candidate, language, err, start, job))
        start = time.perf_counter()
    return rows


def _failed(candidate: str, language: str | None, err: SpeechxferError, start: float, job: _Job) -> SourceScore:
    logger.warning("%s", _not_scored(candidate, language, str(err)))
    return SourceScore(candidate, language, None, 0, time.perf_counter() - start, 0, len(job.target_chars),
                       str(err))


def _zero_shot(candidate: str, recognizer: Recognizer, job: _Job, start: float) -> SourceScore:
    vocabulary = recognizer.vocabulary
    read_back = read_back_table(job.target_chars, vocabulary)
    if not read_back.spellings:
        raise InputError(f"no character of the dev texts maps onto this model's {len(vocabulary)} tokens (no "
                         "shared letter, base letter or transliteration)", path=recognizer.directory)
    hypotheses = {}
    failed = 0
    for event in emissions(recognizer, job.segments, options=job.options, progress=job.progress):
        if isinstance(event, Problem):
            if (event.utterance_id, str(event)) not in job.reported:
                job.reported.add((event.utterance_id, str(event)))
                logger.warning("%s", event)
            hypotheses[event.utterance_id] = ""
            failed += 1
            continue
        segment, log_probs = event
        emitted = vocabulary.collapse_ctc(log_probs.argmax(dim=-1).tolist())
        tokens = [" " if i == vocabulary.delimiter_id else vocabulary.tokens[i] for i in emitted
                  if i == vocabulary.delimiter_id or not _is_control(vocabulary.tokens[i], vocabulary)]
        hypotheses[segment.id] = job.normalizer(read_back(tokens))
    if failed == len(job.segments):  # a CER of 100% would rank it as if it had heard nothing
        raise InputError("no dev utterance could be transcribed (the audio problems are listed above)",
                         path=recognizer.directory)
    report = score(job.references, hypotheses, bootstrap=0)
    row = SourceScore(candidate, recognizer.lang, report.cer, report.sentences, time.perf_counter() - start,
                      read_back.mapped, read_back.characters)
    logger.info("%s%s: CER %.2f%% on %d utterances (%d of %d characters mapped)", candidate,
                f" [{row.language}]" if row.language else "", 100 * report.cer, row.utterances, row.mapped,
                row.characters)
    return row


def format_ranking(scores: Sequence[SourceScore]) -> str:
    """A plain-text table, one row per score in the given order: rank, CER, utterances, seconds, characters
    mapped, language and candidate; a candidate not scored gets "-" and its reason."""
    header = ("rank", "CER", "utterances", "seconds", "mapped", "language", "candidate")
    rows = []
    for position, s in enumerate(scores, start=1):
        if s.cer is None:
            rows.append(("-", "-", "-", f"{s.seconds:.1f}", "-", s.language or "-",
                         _not_scored(s.candidate, None, s.error or "")))
        else:
            rows.append((str(position), f"{100 * s.cer:.2f}%", str(s.utterances), f"{s.seconds:.1f}",
                         f"{s.mapped}/{s.characters}", s.language or "-", s.candidate))
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]])
                     for row in [header, *rows])


def _not_scored(candidate: str, language: str | None, error: str) -> str:
    """"CANDIDATE [LANGUAGE]: not scored: REASON", the candidate named once when the reason starts with it."""
    where = candidate + (f" [{language}]" if language else "")
    reason = error[len(candidate) + 2:] if error.startswith(candidate + ": ") else error
    return f"{where}: not scored: {reason}"


def write_ranking(path: str | os.PathLike, scores: Sequence[SourceScore], *, dev: str | os.PathLike, n: int,
                  normalize: str | Mapping) -> None:
    """The ranking as JSON (atomically): the dev manifest, n, how texts were normalized (a preset or YAML file, or
    the text options themselves), and the rows best first (SourceScore fields)."""
    with atomic_write(path) as f:
        json.dump({"dev": os.fspath(dev), "n": n, "normalize": normalize, "ranking": [s.to_dict() for s in scores]},
                  f, ensure_ascii=False, indent=1)
        f.write("\n")


def resolve_init_from(recipe: Recipe, *, resume: bool = False, device: str = "auto",
                      progress: bool = False) -> Recipe:
    """The recipe with adapt.init_from auto resolved, any other recipe as it is: rank adapt.candidates (or base
    alone) on the first adapt.rank_utterances of data.dev, normalized by the recipe's text section, log the table,
    save it as RUN/source_ranking.json (RUN: recipe.run_dir), and return the recipe with base and adapt.init_lang
    set to the top row's candidate and adapter language (None for a model with one head). train() then writes them
    to RUN/recipe.yaml.

    Before ranking, training.prepare_run checks, marks and locks the output folder as train() does and builds
    data.prepare's manifests, so a folder that train() would refuse costs no ranking. With resume, nothing is ranked
    again: the pick is the run's own (base and adapt.init_lang of RUN/recipe.yaml, or the top row of
    RUN/source_ranking.json when the run stopped before writing that). InputError when data.dev does not exist, when
    no candidate could be scored, and in a run of several processes that has no pick yet (ranking in each process
    would be wasted work, and a near tie might not pick the same source everywhere).
    """
    adapt = recipe.adapt
    if adapt.init_from != "auto":
        return recipe
    run = Path(recipe.run_dir)
    picked = _saved_pick(run) if resume else None
    if picked is not None:
        base, lang, where = picked
        logger.info("adapt.init_from auto: resuming from %s%s, the pick of the run's %s (not ranked again)", base,
                    f" [{lang}]" if lang else "", where)
        return _with_pick(recipe, base, lang)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("adapt.init_from auto ranks the candidates in a single process: run `speechxfer "
                         "rank-sources` and set base (and adapt.init_lang) from its top row, or start the run on one "
                         "process and resume it on several", path=run)
    prepare_run(recipe)
    dev = recipe.data.dev
    if not Path(dev).is_file():
        why = " (data.prepare found no dev split in the corpus)" if recipe.data.prepare is not None else ""
        raise InputError(f"adapt.init_from auto ranks the candidates on data.dev, which does not exist{why}", path=dev)
    candidates = adapt.candidates or (recipe.base,)
    logger.info("adapt.init_from auto: ranking %s on the first %s of %s", counted(len(candidates), "candidate"),
                counted(adapt.rank_utterances, "utterance"), dev)
    scores = rank_sources(candidates, dev, n=adapt.rank_utterances, text_options=recipe.text, device=device,
                          progress=progress)
    logger.info("%s", format_ranking(scores))
    run.mkdir(parents=True, exist_ok=True)
    write_ranking(run / RANKING_FILE, scores, dev=dev, n=adapt.rank_utterances,
                  normalize=dataclasses.asdict(recipe.text))
    best = scores[0]
    if best.cer is None:
        raise InputError("adapt.init_from auto: no candidate could be scored (the reasons are listed above)",
                         path=run / RANKING_FILE)
    logger.info("adapt.init_from auto: starting from %s%s (zero-shot CER %.2f%%)", best.candidate,
                f" [{best.language}]" if best.language else "", 100 * best.cer)
    return _with_pick(recipe, best.candidate, best.language)


def _with_pick(recipe: Recipe, base: str, lang: str | None) -> Recipe:
    return dataclasses.replace(recipe, base=base, adapt=dataclasses.replace(recipe.adapt, init_lang=lang))


def _saved_pick(run: Path) -> tuple[str, str | None, str] | None:
    """(base, init_lang, file name) that a run picked, from its recipe.yaml or else its ranking; None when neither
    is there yet."""
    saved, ranking = run / "recipe.yaml", run / RANKING_FILE
    if saved.is_file():
        try:
            raw = yaml.safe_load(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise InputError(f"unreadable recipe of the run: {err}", path=saved) from None
        if not (isinstance(raw, dict) and isinstance(raw.get("base"), str) and isinstance(raw.get("adapt"), dict)):
            raise InputError("the run's recipe names no base to resume from", path=saved)
        return raw["base"], raw["adapt"].get("init_lang"), saved.name
    if ranking.is_file():
        try:
            rows = json.loads(ranking.read_text(encoding="utf-8"))["ranking"]
            best = rows[0]
            if best["cer"] is not None:
                return best["candidate"], best["language"], ranking.name
        except (OSError, ValueError, LookupError, TypeError) as err:
            raise InputError(f"unreadable ranking of the run: {err!r}", path=ranking) from None
    return None
