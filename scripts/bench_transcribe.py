"""Benchmark `speechxfer transcribe` against transformers' ASR pipeline on the same model.

Cases (each in its own subprocess, so peak RSS is that case's alone):
  folder: N short files (1-6 s); speechxfer batches by length, the pipeline gets the list with batch_size;
  long:   one long file (default 30 min), the pipeline with chunk_length_s/stride_length_s;
  ref:    one 3-minute file, for how peak memory grows with file length.
Prints wall time (model load included, imports not), real-time factor, peak RSS and, on a GPU, the peak GPU memory
torch allocated per case, each line naming the device, then the targets:
folder throughput >= 2x the pipeline's (with --repeat N, median wall times of N alternating runs); peak RSS for
the long file < 2 GiB and within 20% of the 3-minute file's.

  python scripts/bench_transcribe.py                      # random 256-hidden 4-layer model, CPU
  python scripts/bench_transcribe.py --shape xls-r-300m --files 40 --cases folder   # a random XLS-R-300M
  python scripts/bench_transcribe.py --quick              # 40 files, 5-minute long file
  python scripts/bench_transcribe.py --model DIR --device cuda
  python scripts/bench_transcribe.py --shape xls-r-300m --cases folder --exported onnx,int8   # + exported models
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from bench_device import device_name, peak_memory_mib, reset_peak_memory
from speechxfer.export import EXPORT_RECORD, export_model
from speechxfer.scoring import score
from speechxfer.transcribe import COMPUTE_DTYPES, TranscribeOptions

RATE_HZ = 16000
CHUNK_S = TranscribeOptions.chunk_s
STRIDE_S = TranscribeOptions.stride_s
CHARACTERS = "abcdefghijklmnopqrstuvwxyz'"


# Random models the bench makes: "small" has the real conv layout (7 layers, 320x stride) at 256 channels and 4
# transformer layers of 256; "xls-r-300m" has the shape of facebook/wav2vec2-xls-r-300m (315 M parameters).
SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  conv_dim=(256,) * 7, num_conv_pos_embeddings=64),
    "xls-r-300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       conv_dim=(512,) * 7, conv_bias=True, num_conv_pos_embeddings=128),
}


def make_model(directory: Path, shape: str) -> None:
    """A random wav2vec2 CTC model of one of the SHAPES, with a 30-token character vocabulary."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    torch.manual_seed(0)
    tokens = ["[PAD]", "[UNK]", "|", *CHARACTERS]
    config = Wav2Vec2Config(vocab_size=len(tokens), pad_token_id=0, feat_extract_norm="layer",
                            do_stable_layer_norm=True, **SHAPES[shape])
    directory.mkdir(parents=True, exist_ok=True)
    Wav2Vec2ForCTC(config).save_pretrained(directory, safe_serialization=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                         word_delimiter_token="|", bos_token=None, eos_token=None).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE_HZ, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(directory)


def babble(rng: np.random.Generator, samples: int) -> np.ndarray:
    """Speech-like test signal: noise and a wandering tone, loudness changing every 0.1 s."""
    steps = -(-samples // (RATE_HZ // 10))
    envelope = np.repeat(rng.uniform(0.02, 1.0, steps), RATE_HZ // 10)[:samples]
    pitch = np.repeat(rng.uniform(100, 300, steps), RATE_HZ // 10)[:samples]
    tone = np.sin(2 * np.pi * np.cumsum(pitch) / RATE_HZ)
    return (0.2 * envelope * (tone + 0.5 * rng.standard_normal(samples))).astype(np.float32)


def write_long(path: Path, minutes: float, seed: int) -> None:
    """Write in 10-second blocks, so making the file never holds it whole either."""
    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * RATE_HZ)
    with sf.SoundFile(path, "w", samplerate=RATE_HZ, channels=1, subtype="PCM_16") as f:
        for start in range(0, total, 10 * RATE_HZ):
            f.write(babble(rng, min(10 * RATE_HZ, total - start)))


def make_data(workdir: Path, *, files: int, long_min: float, ref_min: float) -> dict[str, Path]:
    folder = workdir / f"folder{files}"
    if not folder.is_dir() or len(list(folder.glob("*.wav"))) != files:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(files):
            sf.write(folder / f"utt{i:04d}.wav", babble(rng, int(rng.uniform(1.0, 6.0) * RATE_HZ)), RATE_HZ,
                     subtype="PCM_16")
    paths = {"folder": folder}
    for name, minutes in (("long", long_min), ("ref", ref_min)):
        path = workdir / f"{name}_{minutes:g}min.wav"
        if not path.is_file():
            write_long(path, minutes, seed=1 if name == "long" else 2)
        paths[name] = path
    return paths


# --- one case, run inside a subprocess ------------------------------------------------------------------


def run_case(tool: str, data: Path, model: Path, device: str, batch_size: int, max_batch_s: float,
             dtype: str) -> dict:
    # Imports stay outside the timed part for both tools (transformers' lazy modules included).
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, pipeline  # noqa: F401

    reset_peak_memory(device)
    if tool == "speechxfer":
        from speechxfer.decoding import GreedyDecoder
        from speechxfer.transcribe import OutputWriter, Recognizer, find_audio, transcribe

        start = time.perf_counter()
        segments, problems = find_audio([str(data)])
        recognizer = Recognizer(model, device=device, dtype=dtype)
        decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)
        writer = OutputWriter(Path(os.environ["BENCH_OUT"]), ["tsv"])
        options = TranscribeOptions(max_batch_s=max_batch_s, chunk_s=CHUNK_S, stride_s=STRIDE_S)
        texts = {}
        for result in transcribe(recognizer, segments, decoder=decoder, options=options):
            writer.write(result)
            texts[Path(result.segment.path).name] = result.transcript.text
        writer.close(segments)
        audio_s = sum(s.duration_s for s in segments)
    else:
        start = time.perf_counter()
        asr = pipeline("automatic-speech-recognition", model=str(model), device=torch.device(device),
                       dtype=getattr(torch, dtype))
        if data.is_dir():
            files = sorted(str(p) for p in data.glob("*.wav"))
            outputs = asr(files, batch_size=batch_size)
        else:
            files = [str(data)]
            outputs = [asr(files[0], chunk_length_s=CHUNK_S, stride_length_s=STRIDE_S, batch_size=batch_size)]
        texts = {Path(f).name: " ".join(o["text"].split()) for f, o in zip(files, outputs)}
        audio_s = sum(sf.info(f).duration for f in files)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"wall_s": wall_s, "audio_s": audio_s, "peak_rss_mib": peak_mib, "peak_gpu_mib": peak_memory_mib(device),
            "texts": texts}


def run_capped(command: list[str], env: dict[str, str], *, cap_mib: float) -> dict | None:
    """Run one case; None when its resident memory passed cap_mib (it is killed: the machine may be shared)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        while child.poll() is None:
            if _rss_mib(child.pid) > cap_mib:
                child.kill()
                child.wait()
                return None
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            sys.exit(f"{' '.join(command[3:5])} failed:\n{err.read()[-3000:]}")
        return json.loads(out.read().strip().splitlines()[-1])


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # the process just ended
        pass
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a random one, --shape)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="small",
                        help="shape of the random model when no --model is given (default small)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/speechxfer-bench"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=tuple(COMPUTE_DTYPES),
                        help="speechxfer's --dtype (autocast); the pipeline gets the model in this dtype")
    parser.add_argument("--files", type=int, default=200, help="short files in the folder case")
    parser.add_argument("--long-min", type=float, default=30.0, help="minutes of the long file")
    parser.add_argument("--ref-min", type=float, default=3.0, help="minutes of the reference file for RSS growth")
    parser.add_argument("--quick", action="store_true", help="40 files and a 5-minute long file")
    parser.add_argument("--batch-size", default="8",
                        help="the pipeline's batch_size; a comma-separated list runs the folder case with each")
    parser.add_argument("--max-batch-s", type=float, default=TranscribeOptions.max_batch_s,
                        help="speechxfer's padded seconds per batch")
    parser.add_argument("--rss-cap-gib", type=float, default=8.0,
                        help="stop a case whose resident memory passes this (the pipeline's grows with file length)")
    parser.add_argument("--cases", default="folder,long,ref", help="which of folder,long,ref to run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of the folder case, tools alternating; its wall time is the median")
    parser.add_argument("--exported", default="",
                        help="also run speechxfer on the model exported (`speechxfer export`, made once in --workdir) "
                             "as each of these: onnx (float32), int8")
    parser.add_argument("--run-case", nargs=2, metavar=("TOOL", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_case:
        tool, data = args.run_case
        print(json.dumps(run_case(tool, Path(data), args.model, args.device, int(args.batch_size),
                                  args.max_batch_s, args.dtype)))
        return
    if args.quick:
        args.files, args.long_min = min(args.files, 40), min(args.long_min, 5.0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = args.workdir / ("model-h256-l4" if args.shape == "small" else f"model-{args.shape}")
        if not (model / "model.safetensors").is_file():
            make_model(model, args.shape)
    data = make_data(args.workdir, files=args.files, long_min=args.long_min, ref_min=args.ref_min)
    models = {"speechxfer": model}  # tool label -> model folder it runs
    for kind in [k.strip() for k in args.exported.split(",") if k.strip()]:
        folder = args.workdir / f"{model.name}-{kind}"
        if not (folder / EXPORT_RECORD).is_file():
            export_model(model, folder, quantize=None if kind == "onnx" else kind)
        models[f"speechxfer {kind}"] = folder
    results: dict[tuple[str, str], dict] = {}  # (case, tool label) -> measurements
    card = device_name(args.device)
    print(f"model {model}, device {args.device} ({card}), dtype {args.dtype}, {os.cpu_count()} CPUs", flush=True)
    sizes = [int(b) for b in args.batch_size.split(",")]
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        # the folder case tries every pipeline batch size; the long files use the first
        runs = [(label, sizes[0]) for label in models]
        runs += [("pipeline", b) for b in (sizes if case == "folder" else sizes[:1])]
        runs *= args.repeat if case == "folder" else 1
        walls: dict[str, list[float]] = {}
        for tool, batch_size in runs:
            label = tool if tool in models else f"pipeline bs={batch_size}"
            command = [sys.executable, __file__, "--run-case", tool.split()[0], str(data[case]),
                       "--model", str(models.get(tool, model)),
                       "--device", args.device, "--batch-size", str(batch_size),
                       "--max-batch-s", str(args.max_batch_s), "--dtype", args.dtype]
            env = os.environ | {"BENCH_OUT": str(args.workdir / f"out-{case}"), "TQDM_DISABLE": "1"}
            r = run_capped(command, env, cap_mib=args.rss_cap_gib * 1024)
            if r is None:
                print(f"{case:<7} {label:<16} stopped: RSS passed {args.rss_cap_gib:g} GiB", flush=True)
                continue
            gpu = "" if r["peak_gpu_mib"] is None else f"  peak GPU {r['peak_gpu_mib']:7.0f} MiB"
            print(f"{case:<7} {label:<16} audio {r['audio_s']:8.1f} s  wall {r['wall_s']:7.1f} s  "
                  f"RTF {r['wall_s'] / r['audio_s']:.4f}  peak RSS {r['peak_rss_mib']:7.0f} MiB{gpu}  [{card}]",
                  flush=True)
            walls.setdefault(label, []).append(r["wall_s"])
            previous = results.get((case, label), r)
            results[case, label] = r | {"wall_s": statistics.median(walls[label]),
                                        "peak_rss_mib": max(r["peak_rss_mib"], previous["peak_rss_mib"]),
                                        "peak_gpu_mib": None if r["peak_gpu_mib"] is None else
                                        max(r["peak_gpu_mib"], previous["peak_gpu_mib"])}
        if args.repeat > 1 and case == "folder":
            for label, values in walls.items():
                print(f"{case:<7} {label:<16} wall over {len(values)} runs: median {statistics.median(values):.1f} s, "
                      f"min {min(values):.1f}, max {max(values):.1f}", flush=True)
    print()
    print(f"{card}, {args.dtype}:")
    print("| case | tool | audio s | wall s | RTF | x real time | peak RSS MiB | peak GPU MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (case, tool), r in results.items():
        print(f"| {case} | {tool} | {r['audio_s']:.1f} | {r['wall_s']:.1f} | {r['wall_s'] / r['audio_s']:.4f} | "
              f"{r['audio_s'] / r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{'-' if r['peak_gpu_mib'] is None else round(r['peak_gpu_mib'])} |")
    print()
    for (case, label), r in results.items():
        if case == "folder" and label not in models:
            for ours in [o for o in models if ("folder", o) in results]:
                ratio = r["wall_s"] / results["folder", ours]["wall_s"]
                print(f"folder throughput {ours} / {label}: {ratio:.2f}x (target >= 2x) [{card}, {args.dtype}]")
    for (case, label), r in results.items():
        if label in models and label != "speechxfer" and (case, "speechxfer") in results:
            ours = results[case, "speechxfer"]["texts"]
            changed = sum(ours.get(name) != text for name, text in r["texts"].items())
            apart = score(ours, r["texts"], allow_missing=True, bootstrap=0).cer if any(ours.values()) else 0
            print(f"{case} {label}: {changed} of {len(r['texts'])} transcripts differ from float32 speechxfer's "
                  f"(character difference {apart:.2%})")
    for (case, label), r in results.items():
        if label not in models and (case, "speechxfer") in results:
            ours = results[case, "speechxfer"]["texts"]
            same = sum(ours.get(name) == text for name, text in r["texts"].items())
            # The pipeline normalizes each window on its own and stitches by its own rule; how far apart is that?
            apart = score(r["texts"], ours, allow_missing=True, bootstrap=0).cer if any(r["texts"].values()) else 0
            print(f"{case} transcripts identical to {label}'s: {same} of {len(r['texts'])} "
                  f"(character difference {apart:.2%})")
    if ("long", "speechxfer") in results:
        long_mib = results["long", "speechxfer"]["peak_rss_mib"]
        print(f"long-file peak RSS {long_mib:.0f} MiB (target < 2048) [{card}]")
        if ("ref", "speechxfer") in results:
            for label in [label for case, label in results if case == "long" and ("ref", label) in results]:
                growth = results["long", label]["peak_rss_mib"] / results["ref", label]["peak_rss_mib"] - 1
                print(f"{label} peak RSS {args.long_min:g} min vs {args.ref_min:g} min: {growth:+.1%} "
                      f"(target for speechxfer: within 20%) [{card}]")

if __name__ == "__main__":
    main()
