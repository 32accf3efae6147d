"""The real audio loaders (Speech Commands, ESC-50), each on a tiny fixture in the real layout."""

import csv

import numpy as np
import pytest
import soundfile as sf

from fwdgrad.data import DatasetNotFound, build_dataset


def _tone(path, seconds, rate, freq):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), rate, subtype="PCM_16")


@pytest.fixture
def speechcommands_root(tmp_path):
    folder = tmp_path / "SpeechCommands" / "speech_commands_v0.02"
    for word in ("yes", "no", "cat", "_background_noise_"):
        (folder / word).mkdir(parents=True)
        for spk in ("a1", "b2", "c3"):
            _tone(folder / word / f"{spk}_nohash_0.wav", 0.5, 16000, 440)
    (folder / "validation_list.txt").write_text("yes/b2_nohash_0.wav\n")
    (folder / "testing_list.txt").write_text("yes/c3_nohash_0.wav\nno/c3_nohash_0.wav\ncat/c3_nohash_0.wav\n")
    return tmp_path


def test_speechcommands_uses_official_lists_and_pads_to_one_second(speechcommands_root):
    splits = build_dataset("speechcommands", speechcommands_root, words=["yes", "no"])
    assert splits.classes == ("yes", "no")
    assert sorted(p.name for p in splits.train.paths) == [
        "a1_nohash_0.wav",
        "a1_nohash_0.wav",
        "b2_nohash_0.wav",
    ]
    assert len(splits.test) == 2
    wave, label = splits.test[0]
    assert wave.shape == (1, 16000) and int(label) in (0, 1)
    assert float(wave[0, :8000].abs().max()) > 0.4 and float(wave[0, 8000:].abs().max()) == 0.0
    everything = build_dataset("speechcommands", speechcommands_root)
    assert len(everything.test) == 3 and everything.num_classes == 35


def test_speechcommands_missing_and_bad_word(tmp_path, speechcommands_root):
    with pytest.raises(
        DatasetNotFound, match="speech_commands_v0.02/validation_list.txt; pass download=True"
    ):
        build_dataset("speechcommands", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown word 'hello'"):
        build_dataset("speechcommands", speechcommands_root, words=["yes", "hello"])


@pytest.fixture
def esc50_root(tmp_path):
    folder = tmp_path / "ESC-50-master"
    (folder / "audio").mkdir(parents=True)
    (folder / "meta").mkdir()
    rows = []
    for fold in range(1, 6):
        for target, category in ((0, "dog"), (1, "rooster"), (41, "chainsaw")):
            name = f"{fold}-1000{target}-A-{target}.wav"
            _tone(folder / "audio" / name, 0.25, 44100, 200 + 100 * target)
            rows.append(
                dict(
                    filename=name,
                    fold=fold,
                    target=target,
                    category=category,
                    esc10=target < 2,
                    src_file=1000 + target,
                    take="A",
                )
            )
    with open(folder / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def test_esc50_folds_classes_and_resampling(esc50_root):
    splits = build_dataset("esc50", esc50_root, test_fold=2)
    assert splits.classes == ("dog", "rooster", "chainsaw")
    assert len(splits.train) == 12 and len(splits.test) == 3
    assert all(p.name.startswith("2-") for p in splits.test.paths)
    wave, label = splits.test[2]
    assert wave.shape == (1, 80000) and int(label) == 2  # 5 s at 16 kHz
    assert float(wave[0, :3900].abs().max()) > 0.4 and float(wave[0, 4100:].abs().max()) == 0.0
    subset = build_dataset("esc50", esc50_root / "ESC-50-master", classes=[41, 0], sample_rate=8000)
    assert subset.classes == ("chainsaw", "dog") and subset.test[0][0].shape == (1, 40000)
    assert sorted(int(subset.test[i][1]) for i in range(2)) == [0, 1]


def test_esc50_bad_fold_and_missing(tmp_path, esc50_root):
    with pytest.raises(ValueError, match="test_fold must be an integer in \\[1, 5\\], got 6"):
        build_dataset("esc50", esc50_root, test_fold=6)
    with pytest.raises(ValueError, match="unknown ESC-50 class 7"):
        build_dataset("esc50", esc50_root, classes=[7])
    with pytest.raises(DatasetNotFound, match="ESC-50-master/meta/esc50.csv; download"):
        build_dataset("esc50", tmp_path / "nowhere")
