"""Cost of waveform augmentation (speechxfer.augment) in seconds of audio per second, for each effect alone and for
chains, on utterances of 2-10 s at 16 kHz, in one process (one loader worker's view).

Each case augments the same utterances once after a warm-up call (which imports scipy and indexes the noise
folder); prints audio-s per wall-second and per CPU-second (the CPU figure holds up better on a busy machine).
Every effect in a case runs with probability 1 unless the case says otherwise, so the figures are per augmented
utterance; speed uses factors 0.9/1.1 so that every utterance is resampled.

  python scripts/bench_augment.py                              # noise files: Debian's music on hold if installed
  python scripts/bench_augment.py --noise DIR --utterances 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import soundfile as sf

from speechxfer.audio import SAMPLE_RATE_HZ
from speechxfer.augment import (AugmentOptions, GainOptions, NoiseOptions, ReverbOptions, SpeedOptions,
                                TelephoneOptions, augment, check_sources)

MUSIC_ON_HOLD = "/usr/share/asterisk/moh"  # Debian asterisk-moh-opsound-wav: 8 kHz music


def cases(noise_source: str) -> dict[str, AugmentOptions]:
    """Named option sets: each effect alone, then a typical chain and everything at once."""
    return {
        "speed 0.9/1.1": AugmentOptions(speed=SpeedOptions(probability=1.0, factors=(0.9, 1.1))),
        "noise, generated": AugmentOptions(noise=NoiseOptions(probability=1.0)),
        "noise, files": AugmentOptions(noise=NoiseOptions(probability=1.0, source=noise_source)),
        "reverb, simulated": AugmentOptions(reverb=ReverbOptions(probability=1.0)),
        "telephone": AugmentOptions(telephone=TelephoneOptions(probability=1.0)),
        "telephone, 8 kHz only": AugmentOptions(telephone=TelephoneOptions(probability=1.0, band_pass=False,
                                                                           mu_law=False)),
        "gain": AugmentOptions(gain=GainOptions(probability=1.0)),
        # what a real-speech recipe might use: Kaldi's 3-way speed on all, each other effect on some utterances
        "typical chain": AugmentOptions(speed=SpeedOptions(probability=1.0),
                                        reverb=ReverbOptions(probability=0.3),
                                        noise=NoiseOptions(probability=0.5, source=noise_source),
                                        gain=GainOptions(probability=0.5),
                                        telephone=TelephoneOptions(probability=0.3)),
        "all effects, always": AugmentOptions(speed=SpeedOptions(probability=1.0, factors=(0.9, 1.1)),
                                              reverb=ReverbOptions(probability=1.0),
                                              noise=NoiseOptions(probability=1.0, source=noise_source),
                                              gain=GainOptions(probability=1.0),
                                              telephone=TelephoneOptions(probability=1.0)),
    }


def utterances(count: int, *, min_s: float, max_s: float, seed: int = 0) -> list[np.ndarray]:
    """Random-length broadband signals (a few tones plus noise), float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    waves = []
    for _ in range(count):
        t = np.arange(int(rng.uniform(min_s, max_s) * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
        tones = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 4000, size=3))
        waves.append((0.1 * tones + 0.02 * rng.standard_normal(t.size)).astype(np.float32))
    return waves


def write_noise_folder(folder: str) -> str:
    """Three minutes of generated noise in 8 kHz files, for machines without the music on hold."""
    rng = np.random.default_rng(1)
    for i in range(6):
        sf.write(os.path.join(folder, f"noise{i}.wav"), 0.1 * rng.standard_normal(30 * 8000), 8000)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--min-s", type=float, default=2.0)
    parser.add_argument("--max-s", type=float, default=10.0)
    parser.add_argument("--noise", help=f"noise folder or list (default {MUSIC_ON_HOLD} when installed, else "
                                        "generated files)")
    parser.add_argument("--cases", nargs="+", help="names of cases to run (default all)")
    args = parser.parse_args()

    waves = utterances(args.utterances, min_s=args.min_s, max_s=args.max_s)
    audio_s = sum(w.size for w in waves) / SAMPLE_RATE_HZ
    with tempfile.TemporaryDirectory() as scratch:
        noise = args.noise or (MUSIC_ON_HOLD if os.path.isdir(MUSIC_ON_HOLD) else write_noise_folder(scratch))
        print(f"{len(waves)} utterances, {audio_s:.0f} s of audio ({args.min_s:g}-{args.max_s:g} s each); "
              f"noise files: {noise}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print(f"{'case':24} {'audio-s/wall-s':>15} {'audio-s/CPU-s':>14}")
        for name, options in cases(noise).items():
            if args.cases and name not in args.cases:
                continue
            check_sources(options)
            augment(waves[0], options=options, seed=0, epoch=-1, utterance_id="warm-up")
            wall, cpu = time.perf_counter(), time.process_time()
            for i, wave in enumerate(waves):
                augment(wave, options=options, seed=0, epoch=0, utterance_id=str(i))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{name:24} {audio_s / wall:15.0f} {audio_s / cpu:14.0f}", flush=True)


if __name__ == "__main__":
    main()
