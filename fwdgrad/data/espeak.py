"""eSpeak NG as shipped by the ``espeakng-loader`` wheel: voice listing and rendering.

The wheel provides ``libespeak-ng.so`` (``espeakng_loader.get_library_path()``) and its voice data
(``get_data_path()``). eSpeak NG is a process-global C library that keeps state between utterances (its
pitch-flutter phase advances with every sample rendered), so the same text does not render to the
same samples twice in one process. :func:`synthesize` therefore renders a whole list of utterances, in
order, in a fresh Python process running :mod:`fwdgrad.data.espeak_worker`, seeding eSpeak's noise
generators per utterance; the output depends only on that list, and the library never loads into the
caller's process.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import astuple, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from fwdgrad.data import espeak_worker
from fwdgrad.data.errors import check_choice


class EspeakUnavailable(RuntimeError):
    """eSpeak NG (from the espeakng-loader wheel) cannot be loaded."""


@dataclass(frozen=True)
class Utterance:
    """One thing to say: ``voice`` is ``language[+variant]``, ``rate`` in words per minute (80-450),
    ``pitch`` 0-100 (50 is the voice's normal pitch), ``seed`` for eSpeak's noise generators."""

    text: str
    voice: str
    rate: int
    pitch: int
    seed: int


def espeak_paths() -> tuple[Path, Path]:
    """(shared library, voice data folder) of the installed espeakng-loader wheel."""
    try:
        import espeakng_loader

        library, data = Path(espeakng_loader.get_library_path()), Path(espeakng_loader.get_data_path())
    except (ImportError, RuntimeError) as err:
        raise EspeakUnavailable(f"eSpeak NG unavailable: {err}; install the espeakng-loader wheel") from err
    if not library.is_file():
        raise EspeakUnavailable(f"eSpeak NG library missing at {library}; reinstall espeakng-loader")
    return library, data


@cache
def english_languages() -> tuple[str, ...]:
    """The English accents the shipped data define (voice file names, lower-cased), e.g. ``en-us``."""
    _, data = espeak_paths()
    names = {p.name.lower() for p in (data / "lang").rglob("en*") if p.is_file()}
    return tuple(sorted(names - {"en-shaw"}))  # en-shaw reads Shavian script, not English text


@cache
def voice_variants() -> tuple[str, ...]:
    """The voice variants (``+name`` suffixes) in ``espeak-ng-data/voices/!v``, e.g. ``f3``, ``m2``."""
    _, data = espeak_paths()
    return tuple(
        sorted(p.name for p in (data / "voices" / "!v").iterdir() if p.is_file() and " " not in p.name)
    )


def list_voices() -> tuple[str, ...]:
    """Every English ``language+variant`` combination the shipped data support."""
    return tuple(f"{lang}+{variant}" for lang in english_languages() for variant in voice_variants())


def check_voice(voice: str) -> None:
    """Raise ``ValueError`` unless ``voice`` is ``language`` or ``language+variant`` from the shipped data.

    eSpeak itself silently ignores an unknown variant, hence this check.
    """
    lang, _, variant = voice.partition("+")
    check_choice("eSpeak language", lang, english_languages())
    if variant:
        check_choice("eSpeak voice variant", variant, voice_variants())


def synthesize(utterances: list[Utterance]) -> tuple[int, list[np.ndarray]]:
    """Render ``utterances`` in order in a fresh process; returns (sample rate, int16 arrays)."""
    for u in utterances:
        check_voice(u.voice)
    library, data = espeak_paths()
    request = pickle.dumps((str(library), str(data), [astuple(u) for u in utterances]))
    done = subprocess.run([sys.executable, espeak_worker.__file__], input=request, capture_output=True)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise EspeakUnavailable(f"eSpeak NG worker failed: {message[-1] if message else done.returncode}")
    return pickle.loads(done.stdout)
