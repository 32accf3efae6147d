"""The synthetic eSpeak NG keyword generator, its cache and the audio features."""

import csv

import numpy as np
import pytest
import soundfile as sf
import torch

from fwdgrad.data import (
    EspeakUnavailable,
    KeywordConfig,
    build_dataset,
    compute_features,
    generate_keywords,
    list_voices,
    load_keywords,
    log_mel_transform,
    mfcc_transform,
)
from fwdgrad.data.espeak import Utterance, synthesize
from fwdgrad.data.keywords import voice_split


def _espeak_or_skip():
    try:
        synthesize([Utterance("yes", "en-us", 175, 50, 1)])
    except EspeakUnavailable as err:
        pytest.skip(f"eSpeak NG cannot load here: {err}")


WORDS = ("yes", "no", "seven")
VOICES = ("en-us+f3", "en-gb-scotland+m2", "en-029+m7")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    _espeak_or_skip()
    config = KeywordConfig(words=WORDS, voices=VOICES, clips_per_word=3, seed=11)
    out = tmp_path_factory.mktemp("kw")
    generate_keywords(out, config)
    return out, config


def test_clips_are_one_second_16khz_non_silent_wavs_listed_in_the_manifest(generated):
    out, config = generated
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "word", "voice", "rate", "pitch", "noise", "snr_db", "seed"]
    assert [r["word"] for r in rows] == [w for w in WORDS for _ in range(3)]
    assert {r["voice"] for r in rows} <= set(VOICES)
    for r in rows:
        info = sf.info(out / r["path"])
        assert (info.samplerate, info.frames, info.channels, info.subtype) == (16000, 16000, 1, "PCM_16")
        audio, _ = sf.read(out / r["path"])
        assert 0.25 < np.abs(audio).max() < 1.0
        assert 130 <= int(r["rate"]) <= 210 and 25 <= int(r["pitch"]) <= 75
        assert r["noise"] in ("white", "pink", "brown", "hum") and 5 <= float(r["snr_db"]) <= 30
        assert r["path"].startswith(f"{r['word']}/")
    config_json = (out / "config.json").read_text()
    assert '"synthetic": true' in config_json and '"dataset": "synth_keywords"' in config_json


def test_speech_dominates_the_noise(generated):
    """The loudest 100 ms (speech) is well above the quietest 100 ms (noise floor) in every clip."""
    out, _ = generated
    waves, labels, rows = load_keywords(out, WORDS)
    assert waves.shape == (9, 1, 16000) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    frames = waves[:, 0].reshape(9, 10, 1600).pow(2).mean(-1)
    assert bool((frames.max(1).values > 4 * frames.min(1).values).all())


def test_generation_is_deterministic_and_seeded(generated, tmp_path):
    out, config = generated
    generate_keywords(tmp_path / "again", config)
    for wav in sorted(out.glob("*/*.wav")):
        assert wav.read_bytes() == (tmp_path / "again" / wav.relative_to(out)).read_bytes()
    assert (out / "manifest.csv").read_bytes() == (tmp_path / "again" / "manifest.csv").read_bytes()
    other = KeywordConfig(words=("yes",), voices=VOICES, clips_per_word=3, seed=12)
    generate_keywords(tmp_path / "other", other)
    assert (tmp_path / "other" / "yes" / "yes_00000.wav").read_bytes() != (
        out / "yes" / "yes_00000.wav"
    ).read_bytes()


def test_voices_come_from_the_shipped_data_and_bad_input_is_rejected():
    voices = list_voices()
    assert len(voices) > 100 and "en-us+f3" in voices and "en-gb-scotland+m2" in voices
    with pytest.raises(ValueError, match="unknown eSpeak voice variant 'nobody'"):
        KeywordConfig(voices=("en-us+nobody",))
    with pytest.raises(ValueError, match="unknown eSpeak language 'xx'"):
        KeywordConfig(voices=("xx",))
    with pytest.raises(ValueError, match="unknown keyword 'hello'"):
        KeywordConfig(words=("yes", "hello"))


def test_features_have_the_documented_shapes():
    waves = torch.randn(3, 1, 16000) * 0.1
    assert log_mel_transform()(waves).shape == (3, 1, 40, 101)
    assert mfcc_transform()(waves).shape == (3, 1, 13, 101)
    batched = compute_features(waves, "logmel", batch_size=2)
    assert torch.allclose(batched[2], log_mel_transform()(waves[2:])[0], atol=1e-5)  # per-clip, batch-free
    assert compute_features(waves, "waveform") is waves
    with pytest.raises(ValueError, match="unknown feature kind 'stft'"):
        compute_features(waves, "stft")


def test_build_synth_keywords_caches_and_splits_by_voice(tmp_path):
    _espeak_or_skip()
    voices = ("en-us+f1", "en-us+m3", "en+f2", "en+m5", "en-029+f4")
    options = dict(words=["yes", "no"], voices=voices, clips_per_word=10, features="mfcc", test_fraction=0.4)
    splits = build_dataset("synth_keywords", tmp_path, seed=0, **options)
    assert splits.synthetic and splits.classes == ("yes", "no")
    assert splits.train.tensors[0].shape[1:] == (1, 13, 101) and len(splits.train) + len(splits.test) == 20
    (folder,) = (tmp_path / "synth_keywords").iterdir()
    stamp = (folder / "manifest.csv").stat().st_mtime_ns
    again = build_dataset("synth_keywords", tmp_path, seed=0, **options)
    assert (folder / "manifest.csv").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert torch.equal(again.test.tensors[0], splits.test.tensors[0])
    _, _, rows = load_keywords(folder, ("yes", "no"))
    train, test = voice_split(rows, 0.4, seed=0)
    assert len(test) == len(splits.test) and len(test) > 0
    assert not {rows[i]["voice"] for i in train} & {rows[i]["voice"] for i in test}
    assert len({rows[i]["voice"] for i in test}) == 2  # 40% of 5 voices


def test_an_unloadable_espeak_library_is_a_clear_error(tmp_path, monkeypatch):
    import espeakng_loader

    from fwdgrad.data import espeak

    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: str(tmp_path / "missing.so"))
    with pytest.raises(EspeakUnavailable, match="library missing at .*missing.so; reinstall espeakng-loader"):
        synthesize([Utterance("yes", "en-us", 175, 50, 1)])
    fake = tmp_path / "libespeak-ng.so"
    fake.write_bytes(b"not a shared library")
    monkeypatch.setattr(espeak, "espeak_paths", lambda: (fake, tmp_path))
    with pytest.raises(EspeakUnavailable, match="worker failed: OSError: .*libespeak-ng.so"):
        synthesize([Utterance("yes", "en-us", 175, 50, 1)])
