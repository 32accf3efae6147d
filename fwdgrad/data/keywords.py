"""``synth_keywords``: SYNTHETIC spoken keywords rendered offline with eSpeak NG.

Speech-Commands-style vocabulary spoken by many eSpeak voices (English accents x voice variants) with
random speaking rate and pitch, a random loudness and position in the 1 s window, and synthetic
background noise (white, pink, brown or mains hum) at a random SNR. Clips are resampled to 16 kHz,
padded/cropped to 1 s and cached as 16-bit WAV files::

    <out_dir>/config.json                       the generating KeywordConfig, with "synthetic": true
    <out_dir>/manifest.csv                      path,word,voice,rate,pitch,noise,snr_db,seed
    <out_dir>/<word>/<word>_<clip index>.wav    mono PCM_16 at 16 kHz

This is synthetic speech: results on it are not results on recorded speech and are labelled as such.
Generation is deterministic given the configuration: every random choice of clip ``i`` comes from a
generator seeded with the clip's own seed (derived from ``(seed, i)`` and listed in the manifest),
and eSpeak renders the clips in a fresh process (see :mod:`fwdgrad.data.espeak`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from fwdgrad.data.audio import SPEECH_COMMANDS_WORDS
from fwdgrad.data.errors import check_choice
from fwdgrad.data.espeak import Utterance, check_voice, synthesize

CORE_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FEWSHOT_WORDS = tuple(w for w in SPEECH_COMMANDS_WORDS if w not in CORE_WORDS + DIGIT_WORDS)
ACCENTS = (
    "en-us",
    "en",
    "en-gb-scotland",
    "en-029",
    "en-gb-x-rp",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
DEFAULT_VOICES = tuple(f"{accent}+{variant}" for accent in ACCENTS for variant in VARIANTS)
NOISE_TYPES = ("white", "pink", "brown", "hum")
MANIFEST_FIELDS = ("path", "word", "voice", "rate", "pitch", "noise", "snr_db", "seed")
GENERATOR_VERSION = 1  # bump when the recipe changes, so caches made by older code are not reused


@dataclass(frozen=True)
class KeywordConfig:
    """What to generate. ``rate`` is eSpeak's words per minute, ``pitch`` its 0-100 scale (50 normal);
    ``snr_db_range=None`` leaves the clips clean."""

    words: tuple[str, ...] = CORE_WORDS + DIGIT_WORDS
    voices: tuple[str, ...] = DEFAULT_VOICES
    clips_per_word: int = 40
    seed: int = 0
    rate_range: tuple[int, int] = (130, 210)
    pitch_range: tuple[int, int] = (25, 75)
    snr_db_range: tuple[float, float] | None = (5.0, 30.0)
    sample_rate: int = 16000
    duration_s: float = 1.0

    def __post_init__(self) -> None:
        for word in self.words:
            check_choice("keyword", word, SPEECH_COMMANDS_WORDS)
        for voice in self.voices:
            check_voice(voice)
        if self.clips_per_word < 1 or not self.words or not self.voices:
            raise ValueError(
                f"need clips_per_word >= 1 and non-empty words/voices, got {self.clips_per_word}"
            )

    def fingerprint(self) -> str:
        """Short hash of the configuration and generator version, naming its cache folder."""
        key = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:12]


def clip_seed(seed: int, index: int) -> int:
    """The 32-bit seed of clip ``index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def _colored_noise(kind: str, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise: white, pink (1/f power), brown (1/f^2) or 50/60 Hz mains hum with harmonics."""
    if kind == "hum":
        t = np.arange(n) / sample_rate
        base = rng.choice([50.0, 60.0])
        phases = rng.uniform(0, 2 * np.pi, size=4)
        noise = sum(np.sin(2 * np.pi * base * (k + 1) * t + phases[k]) / (k + 1) for k in range(4))
        noise = noise + 0.1 * rng.standard_normal(n)
    else:
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, d=1.0 / sample_rate)
        exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]
        spectrum[1:] /= freqs[1:] ** exponent
        spectrum[0] = 0.0
        noise = np.fft.irfft(spectrum, n)
    return noise / np.sqrt(np.mean(noise**2))


def _trim(wave: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Drop leading and trailing samples quieter than ``threshold`` times the peak."""
    loud = np.flatnonzero(np.abs(wave) > threshold * np.abs(wave).max()) if wave.size else []
    return wave[loud[0] : loud[-1] + 1] if len(loud) else wave


def _finish_clip(
    raw: np.ndarray, native_rate: int, config: KeywordConfig, rng: np.random.Generator
) -> tuple[np.ndarray, str, float]:
    """Resample, level, place in the window and add noise; returns (float32 clip, noise kind, SNR)."""
    g = np.gcd(config.sample_rate, native_rate)
    speech = resample_poly(_trim(raw.astype(np.float64) / 32768.0), config.sample_rate // g, native_rate // g)
    n = int(round(config.duration_s * config.sample_rate))
    if len(speech) > n:
        start = (len(speech) - n) // 2
        speech = speech[start : start + n]
    speech = speech * rng.uniform(0.3, 0.9) / max(np.abs(speech).max(), 1e-9)
    offset = int(rng.integers(0, n - len(speech) + 1))
    clip = np.zeros(n)
    clip[offset : offset + len(speech)] = speech
    noise, snr = "none", float("nan")
    if config.snr_db_range is not None:
        noise = str(rng.choice(NOISE_TYPES))
        snr = float(rng.uniform(*config.snr_db_range))
        speech_rms = np.sqrt(np.mean(speech**2))
        clip += _colored_noise(noise, n, config.sample_rate, rng) * speech_rms / 10 ** (snr / 20)
    return np.clip(clip, -1.0, 32767 / 32768).astype(np.float32), noise, snr


def generate_keywords(out_dir: str | Path, config: KeywordConfig) -> Path:
    """Render every clip of ``config`` into ``out_dir`` and write ``manifest.csv`` last; returns its path."""
    out_dir = Path(out_dir)
    plans = []
    for index in range(len(config.words) * config.clips_per_word):
        seed = clip_seed(config.seed, index)
        rng = np.random.default_rng(seed)
        word = config.words[index // config.clips_per_word]
        voice = config.voices[int(rng.integers(len(config.voices)))]
        rate = int(rng.integers(config.rate_range[0], config.rate_range[1] + 1))
        pitch = int(rng.integers(config.pitch_range[0], config.pitch_range[1] + 1))
        plans.append((index, word, Utterance(word, voice, rate, pitch, seed), rng))
    native_rate, raws = synthesize([utterance for _, _, utterance, _ in plans])
    rows = []
    for (index, word, u, rng), raw in zip(plans, raws):
        clip, noise, snr = _finish_clip(raw, native_rate, config, rng)
        rel = f"{word}/{word}_{index:05d}.wav"
        (out_dir / word).mkdir(parents=True, exist_ok=True)
        sf.write(out_dir / rel, clip, config.sample_rate, subtype="PCM_16")
        rows.append(
            dict(
                path=rel,
                word=word,
                voice=u.voice,
                rate=u.rate,
                pitch=u.pitch,
                noise=noise,
                snr_db=f"{snr:.2f}",
                seed=u.seed,
            )
        )
    (out_dir / "config.json").write_text(
        json.dumps(
            {"dataset": "synth_keywords", "synthetic": True, "version": GENERATOR_VERSION, **asdict(config)},
            indent=1,
        )
    )
    manifest = out_dir / "manifest.csv"
    with open(manifest.with_suffix(".tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(manifest.with_suffix(".tmp"), manifest)
    return manifest


def keyword_cache(root: str | Path, config: KeywordConfig) -> Path:
    """The cache folder ``<root>/synth_keywords/<fingerprint>`` for ``config``, generated if incomplete."""
    folder = Path(root) / "synth_keywords" / config.fingerprint()
    if not (folder / "manifest.csv").is_file():
        generate_keywords(folder, config)
    return folder


def read_manifest(folder: str | Path) -> list[dict[str, str]]:
    """The rows of ``<folder>/manifest.csv``."""
    with open(Path(folder) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def load_keywords(
    folder: str | Path, words: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Cached clips of ``words``: float32 waveforms (N,1,T), labels (index in ``words``), manifest rows."""
    rows = [r for r in read_manifest(folder) if r["word"] in words]
    waves = [sf.read(Path(folder) / r["path"], dtype="float32")[0] for r in rows]
    labels = torch.tensor([words.index(r["word"]) for r in rows], dtype=torch.int64)
    return torch.from_numpy(np.stack(waves)).unsqueeze(1), labels, rows


def voice_split(rows: list[dict], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices with disjoint voices; a seeded ``test_fraction`` of voices is held out."""
    voices = sorted({r["voice"] for r in rows})
    if len(voices) < 2:
        raise ValueError(f"a voice-disjoint split needs at least 2 voices, got {voices}")
    n_test = min(max(1, int(round(test_fraction * len(voices)))), len(voices) - 1)
    held_out = set(np.random.default_rng(seed).permutation(voices)[:n_test].tolist())
    is_test = np.array([r["voice"] in held_out for r in rows])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
