"""Worker script that renders utterances with eSpeak NG through ctypes (run by :mod:`fwdgrad.data.espeak`).

Run as ``python espeak_worker.py``: reads a pickle ``(library path, data path, [(text, voice, rate,
pitch, seed), ...])`` from stdin and writes a pickle ``(sample rate, [int16 arrays])`` to stdout. It
imports only ctypes and numpy, so the fresh process starts quickly and does not load the package.
"""

import ctypes
import pickle
import sys

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_Synth returns after calling the callback with all samples
ESPEAK_RATE, ESPEAK_PITCH = 1, 3  # espeak_PARAMETER values
POS_CHARACTER, ESPEAK_CHARS_UTF8 = 1, 1
SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def render(library: str, data: str, utterances: list[tuple[str, str, int, int, int]]) -> tuple[int, list]:
    """Initialise eSpeak in synchronous mode and return (sample rate, one int16 array per utterance)."""
    lib = ctypes.CDLL(library)
    libc = ctypes.CDLL(None)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
    if sample_rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed with the voice data at {data}")
    chunks = []

    def collect(wav, n_samples, events):
        if n_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        return 0

    callback = SYNTH_CALLBACK(collect)  # keep a reference while eSpeak may call it
    lib.espeak_SetSynthCallback(callback)
    out = []
    for text, voice, rate, pitch, seed in utterances:
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak rejected voice {voice!r}")
        lib.espeak_SetParameter(ESPEAK_RATE, rate, 0)
        lib.espeak_SetParameter(ESPEAK_PITCH, pitch, 0)
        lib.espeak_ng_SetRandSeed(seed)
        libc.srand(ctypes.c_uint(seed))  # breath noise uses the C library's rand()
        chunks.clear()
        encoded = text.encode()
        status = lib.espeak_Synth(
            encoded, len(encoded) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None
        )
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} on {text!r} ({voice})")
        out.append(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16))
    return sample_rate, out


if __name__ == "__main__":
    try:
        result = render(*pickle.load(sys.stdin.buffer))
    except (OSError, RuntimeError) as err:
        sys.exit(f"{type(err).__name__}: {err}")
    pickle.dump(result, sys.stdout.buffer)
