"""The training loop: fine-tune a wav2vec2 checkpoint with a new CTC head for one language, on Accelerate.

`train` reads top to bottom: data → vocabulary → model → batches → optimizer → loop → outputs, with `get_lr`
and `evaluate` beside it. The same code runs on CPU, one GPU and several processes (`torchrun`, `accelerate
launch`): every process builds the same global batches from the same seed and takes its own share of each, so
a run's updates do not depend on how many processes share the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import pickle
import random
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
import torch.utils.checkpoint
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from transformers import Wav2Vec2ForCTC

from speechxfer.atomic import TEMP_SUFFIX, atomic_write, sync_folder
from speechxfer.audio import SAMPLE_RATE_HZ, SILENCE_DBFS, is_silent
from speechxfer.augment import check_sources
from speechxfer.batching import (DurationBatchSampler, Examples, FrameGeometry, SpeechDataset, collate,
                                 filter_utterances, frame_geometry, inference_batches)
from speechxfer.decoding import GreedyDecoder, decode_batch
from speechxfer.compat import (enable_gradient_checkpointing, end_loader_workers, fused_optimizer_supported,
                               progress_bar, reset_accelerator_state, write_failure)
from speechxfer.errors import InputError, Problem, WriteError, counted, first_line, output_folder
from speechxfer.freezing import apply_freezing, parameter_groups, parameter_table
from speechxfer.manifest import Utterance, UtteranceTable, check_held_out, read_jsonl, read_manifest_table
from speechxfer.recipe import Recipe, TrainOptions, resolved_yaml
from speechxfer.scoring import ScoreReport, normalize_hypothesis, score
from speechxfer.surgery import (ADAPTER_FILE, MODEL_STAGING, build_ctc_model, build_scratch_model,
                               check_adapter_folder, finish_model_folder, is_lora_model, load_lora_weights,
                               needs_attention_mask, save_model_folder)
from speechxfer.text import TextNormalizer, normalized_references
from speechxfer.vocabulary import Vocabulary, charset_audit, encode_texts

# Tri-stage schedule of fairseq (lr_scheduler/tri_stage_lr_scheduler.py, as in config/finetuning/base_10h.yaml):
# the warm-up starts at 1% of the peak and the exponential decay ends at 5% of it.
INIT_LR_SCALE = 0.01
FINAL_LR_SCALE = 0.05
# AdamW betas and eps of fairseq's wav2vec 2.0 fine-tuning configs.
ADAM_BETAS = (0.9, 0.98)
ADAM_EPS = 1e-8
# Share of empty dev hypotheses, after the warm-up, taken as CTC blank collapse.
BLANK_COLLAPSE_SHARE = 0.9
# What marks a folder as a speechxfer run: this file, created when a run starts and locked while it trains.
# train() writes only into an output folder that is new, empty, or holds it (or last/, from runs before it).
RUN_MARKER = ".speechxfer-run"
# Beside last/ while _save_last replaces it: the new checkpoint being written, and the previous one being deleted.
LAST_STAGING = ".last.staging"
LAST_RETIRED = ".last.retired"
# With a time budget (train.max_minutes) the schedule is get_lr over this many steps of the share of the run done.
SCHEDULE_STEPS = 100_000

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """How a run ended; the model itself is in output_dir."""

    output_dir: str
    updates: int  # optimizer updates done, over all runs of a resumed training
    best_update: int | None  # the update whose model output_dir holds; None without a dev set
    best_dev_wer: float | None
    test_wer: float | None  # of the best model; None without a test set
    test_cer: float | None
    # max_updates or max_minutes (train.*) reached, or eval.patience evaluations without a better dev WER
    stop_reason: Literal["max_updates", "max_minutes", "patience"]

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "patience"


def train(recipe: Recipe, *, resume: bool = False) -> TrainResult:
    """Fine-tune recipe.base (or train recipe.model_config from scratch) on recipe.data and write the best model
    (by dev WER) to recipe.output_dir. The run ends at train.max_updates, at train.max_minutes, or when
    eval.patience runs out (TrainResult.stop_reason).

    With resume=True, continue from output_dir/last/ (model, optimizer, sampler position, RNG states, best so
    far) and reach the same state as a run that was never interrupted. Raises InputError for unusable data.

    output_dir must be new, empty, or a speechxfer run (it holds RUN_MARKER), and must not be, hold or lie inside
    the folder of recipe.base; a run locks it, so a second one is refused. At start, what a kill left half written
    is completed or deleted (_recover_output_dir), so a killed run can always be resumed.
    """
    # Whatever way the run ends, an error included, what it holds open is closed here: the progress bar (left to
    # close when the frame of an error goes, it would draw itself again after the caller's message about that
    # error), the metrics log, the data-loader workers and the output folder's lock. A caller holding the error
    # holds _train's frame, and would hold all of them with it.
    with contextlib.ExitStack() as closing:
        closing.callback(_unlock_output_dir)
        return _train(recipe, resume=resume, closing=closing)


def _train(recipe: Recipe, *, resume: bool, closing: contextlib.ExitStack) -> TrainResult:
    opts = recipe.train
    out = Path(recipe.output_dir)
    run = Path(recipe.run_dir)  # this run's own files: out, or out/<lang> for an adapter
    last = run / "last"
    lang = recipe.adapt.lang  # set for adapters only: the model folder takes MMS's layout
    if recipe.base is None and recipe.model_config is None:
        raise InputError("adapt.init_from auto: no base picked yet (ranking.resolve_init_from picks it)")
    _check_output_dir(recipe, resume=resume)

    # Accelerate sets up several CPU processes (gloo) only when told to use the CPU; on one process leave the choice
    # of device (CUDA, MPS, ...) to it. With DDP, layerdrop and frozen layers leave parameters without gradients in
    # some updates, which DDP must be told to expect.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Accelerate keeps its settings (precision, accumulation) in a process-wide singleton; forget those of an earlier
    # train() in this process, keeping the distributed setup.
    reset_accelerator_state()
    accelerator = Accelerator(cpu=cpu_processes, mixed_precision=_mixed_precision(opts.mixed_precision),
                              gradient_accumulation_steps=opts.grad_accum_steps,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    say = partial(_say, accelerator)
    set_seed(opts.seed, device_specific=True)  # every process draws its own SpecAugment masks and dropout
    if accelerator.mixed_precision != opts.mixed_precision:
        say(f"mixed precision {opts.mixed_precision} is not supported on {accelerator.device}; training in float32")

    # --- the output folder: this run's alone, and whole again after a kill --------------------------------------
    if accelerator.is_main_process:
        _lock_output_dir(out)
        for line in _recover_output_dir(out, last):
            say(line)
    accelerator.wait_for_everyone()
    if resume and not (last / "training_state.pt").is_file():
        say("nothing to resume yet: the run stopped before its first checkpoint; starting from update 0")
        resume = False
    elif not resume:
        _refuse_a_second_run(out, last)
    if resume and accelerator.is_main_process:
        changes = _recipe_changes(run / "recipe.yaml", recipe)
        if changes:
            say(f"resuming with a recipe that differs from the run's recipe.yaml in: {'; '.join(changes)}")

    # --- data: manifests, normalized targets, vocabulary ------------------------------------------------------
    if recipe.data.prepare is not None and not Path(recipe.data.train).exists():
        if accelerator.is_main_process:
            _prepare_manifests(recipe, say)
        accelerator.wait_for_everyone()
    splits = _read_splits(recipe, say)
    normalizer = TextNormalizer(recipe.text)
    # The train texts normalized once (a million rows take seconds): their characters give the vocabulary and the
    # charset audit, and filter_utterances turns them into labels below.
    train_texts = encode_texts(splits["train"].texts, normalizer)
    train_chars = train_texts.character_counts
    if recipe.vocabulary.path is not None:
        vocab = Vocabulary.load(recipe.vocabulary.path)
    else:
        vocab = Vocabulary.from_texts(["".join(train_chars)])
    say(f"vocabulary: {len(vocab)} tokens: {' '.join(vocab.tokens)}")

    # --- model: the source checkpoint with a new CTC head (or a config's random weights), SpecAugment and dropouts
    # from the recipe ----------------------------------------------------------------------------------------------
    if recipe.model_config is not None:
        model = build_scratch_model(recipe.model_config, vocab, config_overrides=dataclasses.asdict(recipe.model),
                                    seed=opts.seed)
        say(f"from scratch: {model.num_parameters() / 1e6:.2f} M parameters, randomly initialised from model_config")
    else:
        model, transfer = build_ctc_model(recipe.base, vocab, config_overrides=dataclasses.asdict(recipe.model),
                                          seed=opts.seed, adapt=recipe.adapt)
        say(f"{recipe.base}: {transfer}")
        if lang is not None:
            check_adapter_folder(out, model)  # the adapters already there must share this run's base weights
            say(f"adapter for language {lang}: saved as {out / ADAPTER_FILE.format(lang)}")
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    # --- batches: drop what cannot train, then buckets of at most max_batch_s seconds ---------------------------
    keep = partial(filter_utterances, normalizer=normalizer, vocab=vocab, config=model.config,
                   min_duration_s=opts.min_duration_s, max_duration_s=opts.max_duration_s,
                   augment_options=recipe.augment)
    examples, dropped = keep(splits["train"], encoded=train_texts)
    del train_texts  # its characters are the examples' labels now
    say(f"train: {counted(len(examples), 'utterance')} kept; {dropped}")
    if recipe.data.pseudo_labelled:
        pseudo_examples, dropped = keep(splits["pseudo_labelled"])
        say(f"pseudo-labelled: {counted(len(pseudo_examples), 'utterance')} kept; {dropped}")
        examples = Examples.concat([examples, pseudo_examples])
    if recipe.augment.enabled:
        check_sources(recipe.augment)  # a bad noise or impulse-response folder stops the run here, not in a worker
        say("augment: " + ", ".join(f"{name} p={getattr(recipe.augment, name).probability:g}"
                                    for name in (f.name for f in dataclasses.fields(recipe.augment))
                                    if getattr(recipe.augment, name).probability > 0))
    dev_refs = normalized_references(splits["dev"], normalizer)[0]
    test_refs = normalized_references(splits["test"], normalizer)[0]
    for name, refs in (("dev", dev_refs), ("test", test_refs)):
        if len(refs) < len(splits[name]):
            say(f"{name}: {counted(len(refs), 'utterance')} scored; {len(splits[name]) - len(refs)} left out (text "
                "rejected or empty after normalization)")
    # Batches are re-formed each epoch from the seed and the epoch (DurationBatchSampler), planned from the longest
    # each utterance can come out of speed perturbation, so that they hold at most max_batch_s of audio in any epoch.
    train_audio = partial(SpeechDataset, augment_options=recipe.augment if recipe.augment.enabled else None,
                          seed=opts.seed)
    # Pseudo-labelled manifest k is group k (labelled utterances: group 0), capped at its max_share of each epoch's
    # seconds. The cap is part of the batch plan, which the data, seed and epoch alone fix, so resuming and the
    # global batches for any number of processes hold as before; a loss weight would too, but it needs per-utterance
    # CTC losses computed outside transformers' Wav2Vec2ForCTC.
    pseudo_labelled = dict(enumerate(recipe.data.pseudo_labelled, start=1))
    group_of = {entry.manifest: k for k, entry in pseudo_labelled.items()}
    capped = partial(DurationBatchSampler, max_batch_s=opts.max_batch_s, shuffle=True, seed=opts.seed,
                     num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                     max_share={k: entry.max_share for k, entry in pseudo_labelled.items()})
    groups = _groups(examples, group_of)
    sampler = capped(train_audio(examples).durations_s, groups=groups.tolist())
    first_epoch = sampler.in_epoch(0)
    for k, entry in pseudo_labelled.items():
        mine = groups == k
        held = mine & first_epoch
        count, seconds = np.count_nonzero(held), examples.durations_s[held].sum()
        each_epoch = ("all of them each epoch" if count == np.count_nonzero(mine) else
                      f"about {seconds:.0f} s ({counted(count, 'utterance')}) of them each epoch, drawn anew each "
                      "epoch")
        say(f"pseudo-labelled {entry.manifest}: {counted(np.count_nonzero(mine), 'utterance')}, "
            f"{examples.durations_s[mine].sum():.0f} s; at most {entry.max_share:.0%} of each epoch's seconds: "
            f"{each_epoch}")
    if len(sampler) == 0:
        raise InputError(f"too little training data: {counted(len(examples), 'utterance')} after filtering, not one "
                         f"batch for each of {accelerator.num_processes} processes", path=recipe.data.train)
    short_sampler = None
    if opts.short_first_s is not None and opts.short_first_share > 0:
        short = examples.durations_s <= opts.short_first_s
        short_examples = examples.select(short)
        short_sampler = capped(train_audio(short_examples).durations_s, groups=groups[short].tolist())
        if len(short_sampler) == 0:
            raise InputError(f"train.short_first_s: {len(short_examples)} training utterances up to "
                             f"{opts.short_first_s:g} s, not one batch for each of {accelerator.num_processes} "
                             "processes", path=recipe.data.train)
        say(f"first {opts.short_first_share:.0%} of the run: only the {counted(len(short_examples), 'utterance')} up "
            f"to {opts.short_first_s:g} s")
    attention_mask = needs_attention_mask(model.config)
    # Batches are moved to the device by hand and never passed to accelerator.prepare: the sampler already gives
    # each process its share, and accelerate would shard them a second time. Training batches always carry the
    # mask: a model that takes none at inference still trains with it (see _EncoderFeed).
    make_loader = partial(_loader, attention_mask=attention_mask, num_workers=opts.num_workers)
    make_train_loader = partial(_loader, attention_mask=True, num_workers=opts.num_workers)
    left_out = {name: _LeftOut(name) for name in ("train", "dev", "test")}

    # --- optimizer: AdamW over every parameter (frozen ones get no gradient, so no update and no decay) --------
    freezing = recipe.freezing
    # DDP registers only parameters that require a gradient when it wraps the model: wrap it in the state after
    # the head-only warm-up, so that parameters thawed later are synchronised too.
    method = recipe.adapt.method
    apply_freezing(model, freezing, update=freezing.head_only_updates, method=method)
    groups = parameter_groups(model, lr=opts.lr, weight_decay=opts.weight_decay,
                              layer_lr_decay=freezing.layer_lr_decay)
    for group in groups:
        group["lr_factor"] = group["lr"] / opts.lr  # layer-wise decay; the schedule scales every group alike
    optimizer = adamw(groups, lr=opts.lr, device=accelerator.device)

    state = {"update": 0, "epoch": 0, "position": 0, "best_wer": None, "best_update": None, "evals_without_gain": 0,
             "blank_collapse_warned": False}
    saved = _load_last(last, model, optimizer, sampler) if resume else None
    if saved is not None:
        state = saved["state"]
        say(f"resuming from {last} at update {state['update']}")
    model, optimizer = accelerator.prepare(model, optimizer)
    if saved is not None and saved["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    raw_model = accelerator.unwrap_model(model)
    apply_freezing(raw_model, freezing, update=state["update"], method=method)
    say(parameter_table(raw_model))
    cacheable = opts.feature_cache_mib > 0 and not recipe.augment.enabled and not _EncoderFeed.trainable(raw_model)
    unique_ids = cacheable and len(set(ids := _ids(examples))) == len(ids)  # the cache is keyed by id
    feed = None
    if not attention_mask or cacheable:
        feed = _EncoderFeed(raw_model, max_bytes=opts.feature_cache_mib * 2**20 if cacheable and unique_ids else 0,
                            autocast=accelerator.autocast)
    if not attention_mask:
        say("the model takes no attention mask (group-norm feature encoder) and is decoded one utterance at a time: "
            "its feature encoder gives each training utterance the frames it has alone (its group norm over the "
            "utterance's own frames) and the rest of the model gets the mask, so padding changes nothing it learns "
            "from")
    if cacheable and not unique_ids:
        say("feature encoder output not cached: training utterance ids repeat across manifests")
    elif feed is not None and feed.max_bytes:
        say(f"feature encoder frozen, no augmentation: its output of each training utterance is computed once "
            f"and kept (up to {opts.feature_cache_mib:g} MiB, train.feature_cache_mib)")
    if accelerator.num_processes > 1:
        say(f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}), each taking its share of "
            "every batch")

    # --- outputs that describe the run, written before the first update ---------------------------------------
    log = _MetricsLog(run, accelerator, resume_update=state["update"] if resume else None)
    closing.callback(log.close)
    if accelerator.is_main_process:
        with atomic_write(run / "recipe.yaml") as f:
            f.write(resolved_yaml(recipe))
        audit = charset_audit(train_chars,
                              {name: sorted(refs.items()) for name, refs in (("dev", dev_refs), ("test", test_refs))})
        audit.save(run / "charset_audit.json")
        for line in audit.warnings():
            logger.warning(f"{line} (see {run / 'charset_audit.json'} and the recipe's text section)")
    if resume:
        _restore_rng(last, accelerator.process_index)  # last of all, so nothing above draws from the restored RNG

    # --- the loop -------------------------------------------------------------------------------------------
    for key in ("elapsed_s", "audio_s", "short_epoch", "short_position"):
        state.setdefault(key, 0)  # absent from checkpoints written before time budgets and short-first stages
    batches = _batch_stream(sampler, make_train_loader, partial(train_audio, examples), epoch=state["epoch"],
                            position=state["position"], left_out=left_out["train"],
                            everywhere=partial(_everywhere, accelerator), manifest=recipe.data.train)
    short_batches = None if short_sampler is None else _batch_stream(
        short_sampler, make_train_loader, partial(train_audio, short_examples), epoch=state["short_epoch"],
        position=state["short_position"], left_out=left_out["train"], everywhere=partial(_everywhere, accelerator),
        manifest=recipe.data.train)
    for stream in (batches, short_batches):
        if stream is not None:
            closing.callback(stream.close)  # its data-loader workers go with it
    budget_s = None if opts.max_minutes is None else 60 * opts.max_minutes
    # With a time budget the schedule is laid over the share of the run done, in SCHEDULE_STEPS steps.
    schedule = opts if budget_s is None else dataclasses.replace(opts, max_updates=SCHEDULE_STEPS)
    loop_start = time.perf_counter() - state["elapsed_s"]

    def share_done() -> float:
        """Share of the run done: of max_updates, or of the time budget when that is further along. Also sets
        state["elapsed_s"]: training seconds over all runs, the slowest process's, so that every process takes the
        same decisions from it."""
        elapsed_s = time.perf_counter() - loop_start
        if budget_s is not None and accelerator.num_processes > 1:
            elapsed_s = float(accelerator.gather(torch.tensor([elapsed_s], dtype=torch.float64,
                                                              device=accelerator.device)).max())
        state["elapsed_s"] = elapsed_s
        by_updates = state["update"] / opts.max_updates
        return by_updates if budget_s is None else max(by_updates, state["elapsed_s"] / budget_s)

    progress = closing.enter_context(progress_bar(show=accelerator.is_main_process, initial=state["update"],
                                                  total=opts.max_updates if budget_s is None else None,
                                                  dynamic_ncols=True, desc="train"))
    stopped_early = False
    window = {"loss_sum": 0.0, "utterances": 0, "audio_s": 0.0, "start": time.perf_counter()}
    done = share_done()
    while done < 1:
        update = state["update"]
        if apply_freezing(raw_model, freezing, update=update, method=method):
            say(f"update {update}: freezing changed\n{parameter_table(raw_model)}")
            if feed is not None and feed.max_bytes and _EncoderFeed.trainable(raw_model):
                say(f"update {update}: the feature encoder trains from here on; its cached output is dropped "
                    f"({feed.summary()})")
                feed = feed.without_cache() if not attention_mask else None
        lr = get_lr(update if budget_s is None else min(SCHEDULE_STEPS - 1, int(done * SCHEDULE_STEPS)), schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        short_stage = short_batches is not None and done < opts.short_first_share
        if short_batches is not None and not short_stage:
            say(f"update {update}: the short-utterances-first stage ends; training on every utterance")
            short_batches.close()  # lets its data-loader workers go
            short_batches = None

        model.train()
        grad_norm = None
        for _ in range(opts.grad_accum_steps):
            if short_stage:
                state["short_epoch"], state["short_position"], batch = next(short_batches)
            else:
                state["epoch"], state["position"], batch = next(batches)
            batch_ids, batch_s = batch.pop("ids"), batch.pop("audio_s")
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            features = contextlib.nullcontext() if feed is None else feed.feeding(batch_ids, batch)
            with accelerator.accumulate(model), features:
                loss = model(**batch).loss
                # DDP averages gradients over processes; weighing each by its share of the global batch makes the
                # update the same as one process's even when the shares differ by an utterance.
                local = torch.tensor(float(len(batch_ids)), device=accelerator.device)
                share = local * accelerator.num_processes / accelerator.reduce(local.clone(), reduction="sum")
                accelerator.backward(loss * share)
                if accelerator.sync_gradients and opts.clip_norm is not None:
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), opts.clip_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window["loss_sum"] += float(loss.detach()) * len(batch_ids)
            window["utterances"] += len(batch_ids)
            window["audio_s"] += batch_s
        state["update"] = update = update + 1
        progress.update(1)
        done = share_done()

        if update == 1 or update % opts.log_every == 0 or done >= 1:
            totals = accelerator.reduce(torch.tensor([window["loss_sum"], window["utterances"], window["audio_s"]],
                                                     dtype=torch.float64, device=accelerator.device), reduction="sum")
            loss_sum, utterances, audio_s = totals.tolist()
            state["audio_s"] += audio_s
            elapsed_s = time.perf_counter() - window["start"]
            record = {"update": update, "epoch": state["epoch"], "loss": loss_sum / utterances, "lr": lr,
                      "audio_s_per_s": audio_s / elapsed_s, "grad_norm": grad_norm,
                      "minutes": state["elapsed_s"] / 60, "audio_h": state["audio_s"] / 3600}
            log.write(record)
            postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{lr:.2e}", "audio_s/s": f"{audio_s / elapsed_s:.0f}"}
            progress.set_postfix(postfix if log.last_wer is None else {**postfix, "wer": log.last_wer}, refresh=False)
            window = {"loss_sum": 0.0, "utterances": 0, "audio_s": 0.0, "start": time.perf_counter()}

        if update % recipe.eval.every_updates == 0 or done >= 1:
            if dev_refs:
                dev_loader = make_loader(*_eval_batches(splits["dev"], dev_refs, vocab, opts, accelerator,
                                                       padding_free=not attention_mask))
                report, hyps = evaluate(raw_model, dev_loader, vocab, dev_refs, normalizer=normalizer,
                                        accelerator=accelerator, report_problems=left_out["dev"].add,
                                        report_silent=left_out["dev"].add_silent)
                # of what the model heard: a silent utterance's empty hypothesis says nothing of blank collapse
                heard = [h for utterance_id, h in hyps.items() if utterance_id not in left_out["dev"].silent]
                empty_share = sum(not h for h in heard) / len(heard) if heard else 0.0
                log.write({"update": update, "dev_wer": report.wer, "dev_cer": report.cer,
                           "dev_empty_share": empty_share, "minutes": state["elapsed_s"] / 60})
                say(f"update {update}: dev WER {report.wer:.2%}, CER {report.cer:.2%}")
                past_warmup = done >= opts.warmup_ratio and update >= freezing.head_only_updates
                if past_warmup and not state["blank_collapse_warned"]:
                    warning = blank_collapse_warning(empty_share, update=update)
                    if warning:
                        say(warning)
                        state["blank_collapse_warned"] = True
                if state["best_wer"] is None or report.wer < state["best_wer"]:
                    state.update(best_wer=report.wer, best_update=update, evals_without_gain=0)
                    if accelerator.is_main_process:
                        with _saving(out, f"the best model (update {update})"):
                            save_model_folder(out, raw_model, vocab, lang=lang)
                else:
                    state["evals_without_gain"] += 1
            _save_last(last, raw_model, optimizer, sampler, vocab, state, accelerator, lang=lang)
            patience = recipe.eval.patience
            if patience is not None and state["evals_without_gain"] >= patience:
                say(f"update {update}: no better dev WER in {patience} evaluations; stopping early")
                stopped_early = True
                break
    progress.close()
    if feed is not None and feed.max_bytes:
        say(f"feature encoder cache: {feed.summary()}")
    left_out_count = int(accelerator.reduce(torch.tensor(len(left_out["train"].problems), device=accelerator.device),
                                            reduction="sum"))
    if left_out_count:
        say(f"train: {counted(left_out_count, 'utterance')} left out of their batches when their audio was read "
            "(listed above)")
    stop_reason = ("patience" if stopped_early else
                   "max_updates" if state["update"] >= opts.max_updates else "max_minutes")

    # --- outputs: the best model (or the last one without a dev set), its test score, the curves --------------
    if accelerator.is_main_process and not dev_refs:
        with _saving(out, f"the model (update {state['update']})"):
            save_model_folder(out, raw_model, vocab, lang=lang)
    accelerator.wait_for_everyone()
    test_report = None
    if test_refs:
        best = Wav2Vec2ForCTC.from_pretrained(out, use_safetensors=True).to(accelerator.device)
        test_loader = make_loader(*_eval_batches(splits["test"], test_refs, vocab, opts, accelerator,
                                                    padding_free=not attention_mask))
        test_report, _ = evaluate(best, test_loader, vocab, test_refs, normalizer=normalizer, accelerator=accelerator,
                                  bootstrap=1000, report_problems=left_out["test"].add,
                                  report_silent=left_out["test"].add_silent)
        if accelerator.is_main_process:
            _write_json(run / "test_report.json", {"model_update": state["best_update"], **test_report.to_dict()})
        say(f"test: WER {test_report.wer:.2%}, CER {test_report.cer:.2%} "
            f"({counted(test_report.sentences, 'utterance')})")
    if accelerator.is_main_process:
        log.close()
        plot_curves(run / "metrics.jsonl", run / "curves.png")
        _unlock_output_dir()
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=str(out), updates=state["update"], best_update=state["best_update"],
                       best_dev_wer=state["best_wer"], test_wer=None if test_report is None else test_report.wer,
                       test_cer=None if test_report is None else test_report.cer, stop_reason=stop_reason)


def adamw(groups: list[dict], *, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with fairseq's betas and eps over parameter groups (freezing.parameter_groups), on torch's fused kernel
    where torch has one for `device`: one pass over each group's tensors instead of about ten small operations per
    tensor. The result equals the per-tensor optimizer's up to float rounding (tests/test_training.py)."""
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                             fused=True if fused_optimizer_supported(device) else None)


def get_lr(update: int, options: TrainOptions) -> float:
    """Learning rate of update `update` (0-based) for the top layer: warm-up, then tri-stage or linear decay."""
    warmup = round(options.warmup_ratio * options.max_updates)
    if update < warmup:
        start = options.lr * INIT_LR_SCALE if options.schedule == "tri_stage" else 0.0
        return start + (options.lr - start) * update / warmup
    if options.schedule == "linear":
        return options.lr * max(0.0, (options.max_updates - update) / max(1, options.max_updates - warmup))
    hold = round(options.hold_ratio * options.max_updates)
    if update < warmup + hold:
        return options.lr
    decay = max(1, options.max_updates - warmup - hold)
    return options.lr * FINAL_LR_SCALE ** (min(update - warmup - hold, decay) / decay)


@torch.no_grad()
def evaluate(model: Wav2Vec2ForCTC, loader: Iterable[dict], vocab: Vocabulary, refs: dict[str, str], *,
             normalizer: TextNormalizer, accelerator: Accelerator, bootstrap: int = 0,
             report_problems: Callable[[list[Problem]], object] | None = None,
             silence_dbfs: float | None = SILENCE_DBFS,
             report_silent: Callable[[list[str]], object] | None = None) -> tuple[ScoreReport, dict[str, str]]:
    """Greedy CTC decoding of this process's batches, gathered from every process and scored against `refs`
    ({utterance id: text normalized by `normalizer`}), the hypotheses normalized as `speechxfer evaluate`
    normalizes them (scoring.normalize_hypothesis). Utterances the loader left out (unusable audio) are not scored;
    their Problems go to `report_problems`. Returns the score and {utterance id: hypothesis as decoded}.

    Audio below `silence_dbfs` (None: none) gets an empty hypothesis without a forward pass, as `speechxfer
    evaluate` gives it (transcribe.TranscribeOptions.silence_dbfs, the same default); the ids of such utterances go
    to `report_silent`. A model that takes no attention mask sees no padding (batching.inference_batches): a batch
    planned from listed durations that holds audio of different lengths runs as one forward pass per length."""
    was_training = model.training
    model.eval()
    geometry = frame_geometry(model.config)
    padding_free = not needs_attention_mask(model.config)
    decoder = GreedyDecoder(vocab, frame_s=geometry.stride / SAMPLE_RATE_HZ)
    hyps: dict[str, str] = {}
    left_out: list[str] = []
    with _batches(loader) as batches:
        for batch in batches:
            problems = batch.pop("problems")
            left_out += [p.utterance_id for p in problems]
            if report_problems is not None:
                report_problems(problems)
            ids = batch.pop("ids")
            if not ids:
                continue
            num_samples = batch.pop("num_samples")
            levels_dbfs = batch.pop("levels_dbfs")
            silent = [row for row, level in enumerate(levels_dbfs) if is_silent(level, silence_dbfs)]
            if silent:
                hyps.update((ids[row], "") for row in silent)
                if report_silent is not None:
                    report_silent([ids[row] for row in silent])
            heard = [row for row in range(len(ids)) if row not in silent]
            for part in inference_batches([num_samples[row] for row in heard], padding_free=padding_free):
                rows = [heard[k] for k in part]
                longest = num_samples[rows[0]]
                inputs = {k: batch[k][rows, :longest].to(accelerator.device)
                          for k in ("input_values", "attention_mask") if k in batch}
                with accelerator.autocast():
                    logits = model(**inputs).logits  # (rows, frames, vocab)
                # Frames past the end of a padded utterance are not part of it.
                lengths = torch.tensor([geometry.frames(num_samples[row]) for row in rows])
                transcripts = decode_batch(decoder, logits.float().log_softmax(dim=-1).cpu(), lengths)
                hyps.update((ids[row], t.text) for row, t in zip(rows, transcripts))
    model.train(was_training)
    hyps = {k: v for part in gather_object([hyps]) for k, v in part.items()}
    left_out = set(gather_object(left_out))
    scored = {k: normalize_hypothesis(v, normalizer) for k, v in hyps.items()}
    return score({k: v for k, v in refs.items() if k not in left_out}, scored, bootstrap=bootstrap), hyps


def blank_collapse_warning(empty_share: float, *, update: int) -> str | None:
    """A plain warning when nearly all dev hypotheses are empty after the warm-up, else None."""
    if empty_share < BLANK_COLLAPSE_SHARE:
        return None
    return (f"warning: {empty_share:.0%} of the dev hypotheses are empty after {counted(update, 'update')}: the "
            "model predicts only the CTC blank (blank collapse). Likely causes: a learning rate too high (the model "
            "fell back to blanks) or too low (it has not left the blank plateau yet) - try another train.lr or a "
            "longer train.warmup_ratio; too few updates for this data (raise train.max_updates); or a vocabulary "
            "that does not match the transcripts (see charset_audit.json and the recipe's text section).")


def plot_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Draw training loss and dev WER against updates from a metrics.jsonl into a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    records = [record for _, record in read_jsonl(metrics_path)]
    losses = [(r["update"], r["loss"]) for r in records if "loss" in r]
    wers = [(r["update"], 100 * r["dev_wer"]) for r in records if "dev_wer" in r]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, wer_axes = figure.subplots(1, 2)
    for axes, points, label in ((loss_axes, losses, "training loss (CTC)"), (wer_axes, wers, "dev WER (%)")):
        if points:
            axes.plot(*zip(*points), marker="." if len(points) < 50 else None)
        axes.set_xlabel("update")
        axes.set_title(label)
        axes.grid(alpha=0.3)
    figure.savefig(png_path, dpi=100)


# --- helpers of train(), in the order it uses them ------------------------------------------------------------


def _say(accelerator: Accelerator, message: object) -> None:
    if accelerator.is_main_process:
        logger.info("%s", message)


def _mixed_precision(requested: str) -> str:
    """The requested precision where the device has it; float32 ("no") on CPU and on GPUs without bf16."""
    if requested == "no" or not torch.cuda.is_available():
        return "no"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        return "no"
    return requested


def prepare_run(recipe: Recipe) -> None:
    """What train() does first, for work that must land in the run folder before it (ranking.resolve_init_from):
    check output_dir as a fresh run's (InputError as train() gives), mark it as a speechxfer run and lock it for
    this process (train() takes the lock over), complete or clear what a kill left, and build data.prepare's
    manifests when they are not there yet. One process only."""
    out = Path(recipe.output_dir)
    _check_output_dir(recipe, resume=False)
    _lock_output_dir(out)
    for line in _recover_output_dir(out, Path(recipe.run_dir) / "last"):
        logger.info("%s", line)
    _refuse_a_second_run(out, Path(recipe.run_dir) / "last")
    if recipe.data.prepare is not None and not Path(recipe.data.train).exists():
        _prepare_manifests(recipe, partial(logger.info, "%s"))


def _refuse_a_second_run(out: Path, last: Path) -> None:
    if last.exists():
        raise InputError("the output folder already holds a run (last/): pass --resume to continue it, or choose "
                         "another output_dir", path=out)


def _check_output_dir(recipe: Recipe, *, resume: bool) -> None:
    """InputError unless output_dir may take this run: it must not be or overlap the source checkpoint's folder,
    and must be new, empty or a speechxfer run folder (see RUN_MARKER); with resume, a run folder. Reads only."""
    out = Path(recipe.output_dir).resolve()
    # base is None from model_config (scratch); adapt.init_from auto's candidates are each one that may become base
    for source in filter(None, (recipe.base, *recipe.adapt.candidates)):
        base = Path(source).expanduser()
        if not base.exists():
            continue
        base = base.resolve()
        if out == base or base in out.parents or out in base.parents:
            where = "is" if out == base else "is inside" if base in out.parents else "holds"
            raise InputError(f"the output folder {where} the source checkpoint's folder {base}: training would write "
                             "over the model it starts from; choose another output_dir", path=out)
    output_folder(out, create=False)
    entries = sorted(os.listdir(out)) if out.is_dir() else []
    is_run = (out / RUN_MARKER).is_file() or (out / "last").is_dir() or (out / LAST_STAGING).is_dir()
    if resume and not is_run:
        raise InputError("nothing to resume: no speechxfer run in the output folder", path=out)
    # A folder holding only the manifests of data.prepare is one that `speechxfer prepare` filled for this recipe.
    prepared = Path(recipe.run_dir, "manifests").relative_to(recipe.output_dir)
    only_prepared = (recipe.data.prepare is not None and entries == [prepared.parts[0]]
                     and os.listdir(out / prepared.parent) == ["manifests"])
    adapters = sorted(out.glob(ADAPTER_FILE.format("*")))
    if adapters and recipe.adapt.method != "adapter":
        shown = ", ".join(a.name for a in adapters[:3]) + (", ..." if len(adapters) > 3 else "")
        raise InputError(f"the output folder holds language adapters ({shown}) over its base weights, which a "
                         f"{recipe.adapt.method} run would change under them; choose another output_dir", path=out)
    if entries and not is_run and not only_prepared:
        shown = ", ".join(e + "/" if (out / e).is_dir() else e for e in entries[:5])
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise InputError(f"the output folder is not empty and holds no speechxfer run ({shown}{more}): training "
                         "would overwrite or delete these files; choose a new or empty output_dir", path=out)


# The output folder this process holds locked: train() runs once at a time in a process (Accelerate's state is
# process-wide), so a new run may let go of the lock of an earlier one that ended with an exception.
_held_lock: IO | None = None


def _lock_output_dir(out: Path) -> None:
    """Create RUN_MARKER in the output folder, which marks it as a speechxfer run, and hold an exclusive lock on it
    for the rest of the process's run; InputError when another run holds it. The operating system drops the lock
    when the process ends, however it ends, so a killed run leaves no stale lock."""
    _unlock_output_dir()
    output_folder(out)
    marker = open(out / RUN_MARKER, "a+", encoding="utf-8")
    try:
        fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        marker.seek(0)
        holder = marker.read().strip() or "another process"
        marker.close()
        raise InputError(f"another speechxfer train is running in this output folder ({holder}): wait for it to end, "
                         "or choose another output_dir", path=out) from None
    marker.truncate(0)
    marker.write(f"speechxfer train, process {os.getpid()} on {socket.gethostname()}\n")
    marker.flush()
    global _held_lock
    _held_lock = marker


def _unlock_output_dir() -> None:
    global _held_lock
    if _held_lock is not None:
        _held_lock.close()
        _held_lock = None


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold a finished run's folder locked (as train() holds it while training) for work that writes into it after
    train() returned, such as the LM stage; InputError when a train of that folder is running."""
    _lock_output_dir(Path(out))
    try:
        yield
    finally:
        _unlock_output_dir()


def _recover_output_dir(out: Path, last: Path) -> list[str]:
    """Finish or clear what a kill left half done in the output folder; returns one line for each thing done.

    The newest complete state wins: a complete LAST_STAGING (it holds training_state.pt) is newer than last/ and
    takes its place; an incomplete one, a LAST_RETIRED and the temporary files of atomic_write are garbage; a model
    save past its commit point is completed (surgery.finish_model_folder).
    """
    done = []
    staging, retired = last.with_name(LAST_STAGING), last.with_name(LAST_RETIRED)
    if (staging / "training_state.pt").is_file():
        _commit_last(staging, last)
        update = _read_checkpoint_file(last / "training_state.pt")["state"]["update"]
        done.append(f"recovered the checkpoint of update {update} from {staging.name}, complete when the run stopped")
    elif staging.exists():
        shutil.rmtree(staging)
        done.append(f"deleted {staging.name}, a checkpoint the run did not finish writing")
    if retired.exists() and not last.exists():
        os.replace(retired, last)  # cannot happen (last/ is retired only once staging is complete); never lose it
        done.append(f"restored last/ from {retired.name}")
    elif retired.exists():
        shutil.rmtree(retired)
        done.append(f"deleted {retired.name}, a replaced checkpoint")
    if (out / MODEL_STAGING).exists():
        done.append(f"deleted {MODEL_STAGING}, a best model the run did not finish writing")
    if finish_model_folder(out):  # also deletes MODEL_STAGING
        done.append("completed the saving of the best model, which the run had begun")
    for temp in sorted({*out.glob(f".*{TEMP_SUFFIX}"), *last.parent.glob(f".*{TEMP_SUFFIX}")}):
        temp.unlink()
        done.append(f"deleted {temp.name}, a file the run did not finish writing")
    return done


def _recipe_changes(saved: Path, recipe: Recipe) -> list[str]:
    """'key: before -> now' for each recipe key whose resolved value differs from the run's recipe.yaml."""
    if not saved.is_file():
        return []
    try:
        before = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"unreadable recipe of the run: {err}", path=saved) from None
    if not isinstance(before, dict):
        raise InputError("the run's recipe is not a mapping of keys to values", path=saved)
    # output_dir is where the run is now: a run folder that was moved is still the same run.
    before = {k: v for k, v in _flatten(before).items() if k != "output_dir"}
    now = {k: v for k, v in _flatten(yaml.safe_load(resolved_yaml(recipe))).items() if k != "output_dir"}
    missing = "(not set)"
    return [f"{key}: {before.get(key, missing)} -> {now.get(key, missing)}" for key in sorted(before.keys() | now.keys())
            if before.get(key, missing) != now.get(key, missing)]


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of nested mappings."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _prepare_manifests(recipe: Recipe, say) -> None:
    from speechxfer.prepare import prepare

    spec = recipe.data.prepare
    folder = Path(recipe.data.train).parent
    say(f"preparing {spec.format} corpus {spec.source} into {folder}")
    result = prepare(spec.format, spec.source, folder)
    for name, summary in result.summaries.items():
        say(f"  {name}: {summary}")
    if result.problems:
        say(f"  {counted(len(result.problems), 'row')} skipped (listed in {folder / 'problems.txt'})")


def _read_splits(recipe: Recipe, say) -> dict[str, Sequence[Utterance]]:
    """The utterances of train and pseudo_labelled (every data.pseudo_labelled manifest), each an UtteranceTable
    (a million rows are held as columns), dev (the first eval.max_dev_utterances) and test; bad rows skipped and
    counted. ManifestError when pseudo labels meet dev or test (manifest.check_held_out)."""
    splits: dict[str, Sequence[Utterance]] = {}
    for name in ("train", "dev", "test"):
        path = getattr(recipe.data, name)
        if path is None or (name != "train" and recipe.data.prepare is not None and not Path(path).exists()):
            splits[name] = []  # a prepared corpus without this split
            continue
        # A stat of every audio file, nothing opened: a missing or empty file is skipped here, with its manifest
        # line, instead of stopping the run at the first batch that draws it.
        utterances, problems = read_manifest_table(path, check_files=True)
        _report_problems(name, problems, say)
        splits[name] = utterances if name == "train" else list(utterances)
    pseudo_labelled = []
    for entry in recipe.data.pseudo_labelled:
        utterances, problems = read_manifest_table(entry.manifest, check_files=True)
        _report_problems(f"pseudo-labelled {entry.manifest}", problems, say)
        pseudo_labelled.append(utterances)
    splits["pseudo_labelled"] = UtteranceTable.concat(pseudo_labelled)
    train = splits["train"]
    check_held_out([*splits["pseudo_labelled"], *(train[i] for i in np.flatnonzero(train.pseudo_labels).tolist())],
                   {"dev": splits["dev"], "test": splits["test"]})
    if recipe.eval.max_dev_utterances is not None:
        splits["dev"] = splits["dev"][:recipe.eval.max_dev_utterances]
    return splits


def _groups(examples: Examples, group_of: dict[str, int]) -> np.ndarray:
    """The group of each training example (int64 (items,)): group_of its manifest, 0 when not listed there."""
    table = examples.utterances
    return np.array([group_of.get(m, 0) for m in table.manifests], dtype=np.int64)[table.sources[examples.rows]]


def _ids(examples: Examples) -> list[str]:
    """The id of each training example, without building its Utterance."""
    ids = examples.utterances.ids
    return [ids[row] for row in examples.rows.tolist()]


def _report_problems(split: str, problems: Sequence[Problem], say) -> None:
    if not problems:
        return
    kinds = Counter(p.kind for p in problems)
    listed = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    say(f"{split}: {counted(len(problems), 'bad row')} skipped ({listed}), e.g.:\n"
        + "\n".join(f"  {p}" for p in problems[:5]))


def _loader(dataset: SpeechDataset, batches: Iterable[list[int]], *, attention_mask: bool,
            num_workers: int) -> DataLoader:
    # Our own generator, so that creating the iterator does not draw from the global RNG: a resumed run must see
    # the same random numbers as an uninterrupted one.
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      collate_fn=partial(_collate_with_lengths, attention_mask=attention_mask),
                      generator=torch.Generator())


def _collate_with_lengths(items: list[dict], *, attention_mask: bool) -> dict:
    """batching.collate of the items whose audio could be used, plus each one's length in samples (to trim padded
    frames when decoding) and level ("levels_dbfs", to leave silence undecoded), their seconds as listed
    ("audio_s") and the Problems of those left out ("problems"). "ids" is empty when all were."""
    usable = [item for item in items if "problem" not in item]
    problems = [item["problem"] for item in items if "problem" in item]
    batch = collate(usable, attention_mask=attention_mask) if usable else {"ids": []}
    batch["num_samples"] = [len(item["input_values"]) for item in usable]
    batch["levels_dbfs"] = [item["level_dbfs"] for item in usable]
    batch["audio_s"] = sum(item["duration_s"] for item in usable)
    batch["problems"] = problems
    return batch


def _batch_stream(sampler: DurationBatchSampler, make_loader, make_dataset: Callable[..., SpeechDataset], *,
                  epoch: int, position: int, left_out: _LeftOut, everywhere: Callable[[bool], bool],
                  manifest: str) -> Iterator[tuple[int, int, dict]]:
    """This process's training batches, epoch after epoch, starting after `position` batches of `epoch`.

    The loader is made anew each epoch from make_dataset(epoch=...), so that augmentation draws from the epoch.

    Yields (epoch, batches of the epoch consumed so far, batch) so a checkpoint can resume at the next batch
    without loading the audio of the batches before it. The loop keeps this position itself because the
    sampler's own runs ahead of training when data-loader workers prefetch. Utterances whose audio cannot be used
    go to `left_out`; a batch is skipped when any process's share of it is left empty (`everywhere` agrees on that
    across processes, so they stay in step). The same files fail every time, so a resumed run skips the same.
    `manifest` (the train manifest) is named when no batch of an epoch has usable audio.
    """
    while True:
        sampler.set_epoch(epoch)
        whole_epoch, yielded = position == 0, False
        # this process's batches of the epoch after `position`, each made as the loader asks for it
        mine = itertools.islice(filter(None, sampler.batches(epoch)), position, None)
        with _batches(make_loader(make_dataset(epoch=epoch), mine)) as batches:
            for position, batch in enumerate(batches, start=position + 1):
                batch.pop("num_samples")
                batch.pop("levels_dbfs")
                left_out.add(batch.pop("problems"))
                if everywhere(bool(batch["ids"])):
                    yielded = True
                    yield epoch, position, batch
        if whole_epoch and not yielded:  # else the loop would go on forever without an update
            raise InputError("no training batch has usable audio (each utterance left out is listed above)",
                             path=manifest)
        epoch, position = epoch + 1, 0


@contextlib.contextmanager
def _batches(loader: Iterable[dict]) -> Iterator[Iterator[dict]]:
    """An iterator over the loader's batches whose data-loader workers end with the block, however it ends: an
    error raised from a worker comes through the iterator, and a caller holding the error would hold the workers
    (compat.end_loader_workers)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        end_loader_workers(batches)


def _everywhere(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on every process; every process must call this at the same point."""
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return round(float(count)) == accelerator.num_processes


class _LeftOut:
    """Utterances of one split that the data loader left out (audio unreadable, or shorter than listed): each
    reported once, with its manifest and line, by the process that met it (each loads only its own share). And
    those decoding found silent (evaluate's report_silent), counted once."""

    def __init__(self, split: str):
        self.split = split
        self.problems: dict[tuple[str, int | None, str | None], Problem] = {}
        self.silent: set[str] = set()

    def add_silent(self, ids: Iterable[str]) -> None:
        new = set(ids) - self.silent
        if new:
            self.silent |= new
            logger.warning(f"{self.split}: {counted(len(new), 'utterance')} silent (below {SILENCE_DBFS:g} dBFS): "
                           "empty hypotheses, not run through the model")

    def add(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            key = (problem.path, problem.line, problem.utterance_id)
            if key not in self.problems:
                self.problems[key] = problem
                logger.warning(f"{self.split}: left out {problem}")


def _eval_batches(utterances: list[Utterance], refs: dict[str, str], vocab: Vocabulary, options: TrainOptions,
                  accelerator: Accelerator, *, padding_free: bool) -> tuple[SpeechDataset, list[list[int]]]:
    """(dataset, this process's batches) for decoding the utterances that have a reference, longest first, planned
    by batching.inference_batches as `transcribe` and `evaluate` plan theirs (padding_free: the model takes no
    attention mask), so that the greedy WER of the test report is the one `speechxfer evaluate` gives."""
    kept = [u for u in utterances if u.id in refs]
    # Whole batches round-robin, not the training sampler's sharding: that skips batches smaller than the number
    # of processes, and decoding needs no lockstep between processes.
    batches = inference_batches([round(u.duration_s * SAMPLE_RATE_HZ) for u in kept], padding_free=padding_free,
                                max_batch_samples=options.max_batch_s * SAMPLE_RATE_HZ)
    return (SpeechDataset([(u, vocab.encode(refs[u.id])) for u in kept]),
            batches[accelerator.process_index::accelerator.num_processes])


class _EncoderFeed:
    """Computes the conv feature encoder's output of each training utterance as if it were alone, in one padded
    pass, and feeds it to the rest of the model in place of the encoder's forward pass over the padded batch; with
    max_bytes, keeps a frozen encoder's output per utterance and reuses it in later epochs
    (train.feature_cache_mib).

    Two uses. A model without an attention mask (group-norm encoder: the seed, wav2vec2-base) normalizes each
    channel over the whole padded row, so in a padded batch the padding moves every frame of every shorter
    utterance, while `transcribe` decodes such a model one utterance at a time (batching.inference_batches): fed
    this way, with the mask given to the rest of the model (attention and CTC lengths), it learns from the frames
    it is later decoded from. A layer-norm encoder normalizes each frame on its own, so its frames in a padded
    batch are those it gives alone (up to float rounding): the feed only serves the cache there. Every utterance's
    frames are its own, cached or not, so a run's losses depend neither on what fits in max_bytes nor on where it
    was resumed (the cache starts empty), up to float rounding. Cached tensors are kept on the CPU; a trainable
    encoder is run with its gradient and nothing is cached.

    The padded pass (own_frames) needs unpadded, undilated convolutions, whose valid output frames depend on the
    utterance's own samples alone; an encoder built otherwise runs on each utterance alone.
    """

    def __init__(self, model: Wav2Vec2ForCTC, *, max_bytes: float,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.encoder = model.wav2vec2.feature_extractor
        # Each conv layer's geometry, or None when one padded pass cannot give each utterance its own frames.
        self.geometries = _conv_geometries(self.encoder)
        self.max_bytes = max_bytes
        self.autocast = autocast  # the forward pass's precision (accelerate's), so features match the uncached ones
        self.features: dict[str, torch.Tensor] = {}  # utterance id -> (channels, frames)
        self.bytes = 0
        self.lookups = 0
        self.hits = 0

    @staticmethod
    def trainable(model: Wav2Vec2ForCTC) -> bool:
        """Whether any parameter of the model's feature encoder trains (at the current freezing state)."""
        return _EncoderFeed._trains(model.wav2vec2.feature_extractor)

    @staticmethod
    def _trains(encoder: torch.nn.Module) -> bool:
        return any(p.requires_grad for p in encoder.parameters())

    def without_cache(self) -> _EncoderFeed:
        """The same feed with its cache emptied and off (the encoder has thawed)."""
        self.features.clear()
        self.max_bytes = self.bytes = 0
        return self

    def summary(self) -> str:
        return (f"{counted(len(self.features), 'utterance')}, {self.bytes / 2**20:.0f} MiB; {self.hits} of "
                f"{self.lookups} lookups reused")

    @contextlib.contextmanager
    def feeding(self, ids: list[str], batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Within this context, the encoder's forward returns the batch's features (batch, channels, frames),
        zero past the end of each utterance: batch["attention_mask"] gives each one's samples."""
        input_values = batch["input_values"]
        num_samples = batch["attention_mask"].sum(-1).tolist()
        trainable = self._trains(self.encoder)
        parts: list[torch.Tensor | None] = [self.features.get(utterance_id) for utterance_id in ids]
        self.lookups += len(parts)
        missing = [row for row, part in enumerate(parts) if part is None]
        self.hits += len(parts) - len(missing)
        if missing:
            with contextlib.nullcontext() if trainable else torch.no_grad(), self.autocast():
                computed = self.own_frames(input_values[missing], [num_samples[row] for row in missing])
            for row, part in zip(missing, computed):
                if not trainable and self.bytes + part.nbytes <= self.max_bytes:
                    # its own storage, not a view that would keep the whole pass's output alive
                    self.features[ids[row]] = part.contiguous().cpu()
                    self.bytes += part.nbytes
                parts[row] = part
        # (frames, channels) rows padded with zeros, back to (batch, channels, frames)
        features = torch.nn.utils.rnn.pad_sequence([part.to(input_values.device).T for part in parts],
                                                   batch_first=True).transpose(1, 2)
        # An instance attribute shadows the class's forward for the model's call inside this context only.
        self.encoder.forward = lambda input_values: features
        try:
            yield
        finally:
            del self.encoder.forward

    def own_frames(self, input_values: torch.Tensor, num_samples: list[int]) -> list[torch.Tensor]:
        """The encoder's output (channels, frames) of each row of `input_values` (rows, samples) as the encoder
        gives it for the row's first `num_samples` samples alone, computed in one pass over the rows trimmed to the
        longest (one pass a row when the encoder's layout allows no padded pass)."""
        if self.geometries is None:
            return [self.encoder(input_values[row:row + 1, :n])[0] for row, n in enumerate(num_samples)]
        hidden = input_values[:, None, :max(num_samples)]  # (rows, 1, samples)
        frames = num_samples
        for layer, geometry in zip(self.encoder.conv_layers, self.geometries):
            # A frame of an unpadded convolution is computed from a window of its input inside the row's valid
            # frames or not at all, so the valid frames of every layer are the row's own whatever the padding holds;
            # only a group norm's statistics span frames, and they are taken over the valid frames alone.
            frames = [geometry.frames(n) for n in frames]
            if isinstance(getattr(layer, "layer_norm", None), torch.nn.GroupNorm):
                own_layer = partial(_group_norm_layer_by_row, layer)
                if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
                    hidden = torch.utils.checkpoint.checkpoint(own_layer, hidden, frames, use_reentrant=False)
                else:
                    hidden = own_layer(hidden, frames)
            else:
                hidden = layer(hidden)  # conv, layer norm of each frame (or none), activation
        return [hidden[row, :, :n] for row, n in enumerate(frames)]


def _conv_geometries(encoder: torch.nn.Module) -> list[FrameGeometry] | None:
    """Each conv layer's FrameGeometry when every layer of a transformers wav2vec2 feature encoder is an unpadded,
    undilated 1-D convolution followed by no norm, a layer norm (of each frame) or a group norm with the
    activation after it (transformers' Wav2Vec2GroupNormConvLayer); None otherwise."""
    geometries = []
    for layer in getattr(encoder, "conv_layers", []):
        conv, norm = getattr(layer, "conv", None), getattr(layer, "layer_norm", None)
        if not (isinstance(conv, torch.nn.Conv1d) and conv.padding == (0,) and conv.dilation == (1,)
                and (norm is None or isinstance(norm, (torch.nn.LayerNorm, torch.nn.GroupNorm)))
                and hasattr(layer, "activation")):
            return None
        geometries.append(FrameGeometry(conv.kernel_size[0], conv.stride[0]))
    return geometries or None


def _group_norm_layer_by_row(layer: torch.nn.Module, hidden: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """A Wav2Vec2GroupNormConvLayer (conv, GroupNorm, activation) on (rows, channels, samples): the convolution over
    every row at once, the layer's own GroupNorm on each row's first `frames` output frames alone (so its statistics
    are those the row gets when computed alone), zeros past them, then the activation."""
    hidden = layer.conv(hidden)
    normed = None
    for row, num_frames in enumerate(frames):
        own = layer.layer_norm(hidden[row:row + 1, :, :num_frames])[0]
        if normed is None:  # of the norm's dtype: float32 under autocast
            # Not zeros: only the padding is zeroed, one pass over the layer's largest output less. It must be
            # finite, as later layers' weight gradients sum it times a zero gradient.
            normed = own.new_empty(hidden.shape)
        normed[row, :, :num_frames] = own
        normed[row, :, num_frames:] = 0
    return layer.activation(normed)


class _MetricsLog:
    """metrics.jsonl and TensorBoard scalars, written by the main process; remembers the last dev WER."""

    def __init__(self, out: Path, accelerator: Accelerator, *, resume_update: int | None):
        self.active = accelerator.is_main_process
        self.last_wer: str | None = None
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported late: TensorBoard takes a while to load

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        kept = []
        if resume_update is not None and self.path.exists():
            # Records after the checkpoint come from updates the interrupted run lost; the resumed run redoes them.
            records = [record for _, record in read_jsonl(self.path)]
            kept = [r for r in records if r["update"] <= resume_update]
            wers = [r["dev_wer"] for r in kept if "dev_wer" in r]
            self.last_wer = f"{wers[-1]:.1%}" if wers else None
        with atomic_write(self.path) as f:  # a kill while rewriting must not lose the records before the checkpoint
            f.write("".join(json.dumps(r) + "\n" for r in kept))
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_update)

    def write(self, record: dict) -> None:
        if "dev_wer" in record:
            self.last_wer = f"{record['dev_wer']:.1%}"
        if not self.active:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "update" and value is not None:
                self.writer.add_scalar(key, value, record["update"])

    def close(self) -> None:
        """Write out the TensorBoard events still buffered and end its writer's thread; may be called again."""
        if self.active:
            self.writer.close()


def _save_last(last: Path, model: Wav2Vec2ForCTC, optimizer, sampler: DurationBatchSampler, vocab: Vocabulary,
               state: dict, accelerator: Accelerator, *, lang: str | None = None) -> None:
    """Write last/ (model folder, optimizer, sampler, loop state, each process's RNG states) into LAST_STAGING and
    swap it in, so that a kill at any moment leaves last/ or a complete LAST_STAGING (see _recover_output_dir).

    LAST_STAGING is complete once it holds training_state.pt: that file is written last, atomically, after the
    other processes have written their RNG states.
    """
    staging = last.with_name(LAST_STAGING)
    main = accelerator.is_main_process
    with _saving(last, f"the checkpoint of update {state['update']}", staging=staging if main else None):
        if main:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with atomic_write(staging / f"rng_state_{accelerator.process_index}.pt", binary=True) as f:
            torch.save(_rng_state(), f)
        accelerator.wait_for_everyone()
        if main:
            save_model_folder(staging, model, vocab, lang=lang)  # keeps the RNG files already there
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            with atomic_write(staging / "training_state.pt", binary=True) as f:
                torch.save({"state": state, "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
                            "scaler": scaler}, f)
    if main:
        _commit_last(staging, last)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def _saving(folder: Path, what: str, *, staging: Path | None = None) -> Iterator[None]:
    """Around a save of `what` into `folder` written first into `staging` (which takes the place of folder's files
    only once complete, so folder keeps what it held; save_model_folder deletes its own): when the block fails,
    delete `staging` (a full disk gets back the room the new files took; it would be deleted at the next start
    anyway), and make a write that the file system refused (compat.write_failure: a full disk, no permission, also
    safetensors' SafetensorError; save_model_folder's WriteError) an InputError naming `folder`, not a staging
    file nor a traceback."""
    try:
        yield
    except Exception as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        reason = err.reason if isinstance(err, WriteError) else write_failure(err)
        if reason is None:
            raise
        raise InputError(f"cannot save {what}: {reason}; what was saved before is kept, and train --resume "
                         "continues from the last checkpoint", path=folder) from None


def _commit_last(staging: Path, last: Path) -> None:
    """Put a complete LAST_STAGING in the place of last/. A kill at any point leaves last/ or the complete
    staging folder (or both), so _recover_output_dir can call this again."""
    retired = last.with_name(LAST_RETIRED)
    if retired.exists():  # what a kill during its deletion left behind
        shutil.rmtree(retired)
    if last.exists():
        os.replace(last, retired)  # a folder cannot be renamed onto a non-empty one
    os.replace(staging, last)
    sync_folder(last.parent)
    shutil.rmtree(retired, ignore_errors=True)  # what is left is deleted at the next checkpoint or start


def _load_last(last: Path, model: Wav2Vec2ForCTC, optimizer, sampler: DurationBatchSampler) -> dict:
    """Load last/ into the (not yet prepared) model, optimizer and sampler; returns the saved training state."""
    saved = _read_checkpoint_file(last / "training_state.pt")
    try:
        weights = Wav2Vec2ForCTC.from_pretrained(last, use_safetensors=True).state_dict()
    except SafetensorError as err:
        raise InputError(f"unreadable weights (truncated or corrupt): {err}", path=last / "model.safetensors") from None
    except (OSError, ValueError) as err:
        raise InputError(f"unreadable model folder: {err}", path=last) from None
    try:
        if is_lora_model(model):
            # last/ holds the merged model: take every weight but those LoRA wraps (frozen, as built from the base),
            # then the LoRA matrices and head from last/lora/.
            own = model.state_dict()
            model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
            load_lora_weights(model, last)
        else:
            model.load_state_dict(weights)
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError) as err:
        raise InputError(f"last/ does not fit this recipe's model and vocabulary: {err}", path=last) from None
    try:
        sampler.load_state_dict(saved["sampler"])  # checks that the batches are the same as before
    except ValueError as err:
        raise InputError(f"cannot resume: {err}", path=last) from None
    return saved


def _read_checkpoint_file(path: Path) -> dict:
    """torch.load of a file that _save_last wrote; InputError naming the file when it is missing or corrupt."""
    try:
        # weights_only: the file holds tensors and plain containers only (see _rng_state), nothing to unpickle.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Pickled objects beyond tensors and plain containers: not a file _save_last wrote. torch's own message is
        # advice on loading it unsafely; unpickling could run code, so it stays refused.
        raise InputError("not a speechxfer training state: it holds pickled Python objects, which are not loaded "
                         "(unpickling them could run code)", path=path) from None
    except Exception as err:  # a damaged file fails in torch's zip reader or its unpickler, in many ways
        raise InputError(f"unreadable checkpoint file (truncated or corrupt?): {first_line(err)}", path=path) from None


def _rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and plain containers (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _restore_rng(last: Path, process_index: int) -> None:
    path = last / f"rng_state_{process_index}.pt"
    if not path.is_file():  # resumed with more processes than before: the new ones keep their seeded state
        return
    saved = _read_checkpoint_file(path)
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, position, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _write_json(path: Path, value: object) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")
