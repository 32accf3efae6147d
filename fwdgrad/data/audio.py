"""Real audio datasets, read lazily: Google Speech Commands v2 (torchaudio) and ESC-50.

Layouts::

    <root>/SpeechCommands/speech_commands_v0.02/<word>/<speaker>_nohash_<n>.wav  (+ validation_list.txt,
                                                                                   testing_list.txt)
    <root>/ESC-50-master/audio/<fold>-<clip>-<take>-<target>.wav  and  meta/esc50.csv
      (or <root>/audio + <root>/meta/esc50.csv)

``torchaudio.datasets.SPEECHCOMMANDS`` provides the official split lists and file metadata; the
waveforms are read with ``soundfile`` because torchaudio 2.11's ``load`` needs the optional torchcodec
package. Both datasets would take gigabytes as one float tensor, so they are returned as
:class:`AudioClips`, which reads, resamples and pads each clip on access.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset
from torchaudio.datasets import SPEECHCOMMANDS

from fwdgrad.data.errors import DatasetNotFound, check_choice, check_int_range, require_files

SPEECH_COMMANDS_WORDS = (
    "backward",
    "bed",
    "bird",
    "cat",
    "dog",
    "down",
    "eight",
    "five",
    "follow",
    "forward",
    "four",
    "go",
    "happy",
    "house",
    "learn",
    "left",
    "marvin",
    "nine",
    "no",
    "off",
    "on",
    "one",
    "right",
    "seven",
    "sheila",
    "six",
    "stop",
    "three",
    "tree",
    "two",
    "up",
    "visual",
    "wow",
    "yes",
    "zero",
)
_ESC50_HOW = "download https://github.com/karoldvl/ESC-50/archive/master.zip and unzip it into the root"


class AudioClips(Dataset):
    """Audio files as ``(waveform (1, num_samples) float32, label int64)``, mono, at ``sample_rate``.

    Each file is mixed down to mono, resampled if its rate differs and zero-padded or cropped at the
    end to ``num_samples``.
    """

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], sample_rate: int, num_samples: int
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.sample_rate = sample_rate
        self.num_samples = num_samples

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        data, rate = sf.read(self.paths[index], dtype="float32", always_2d=True)
        wave = torch.from_numpy(data.mean(axis=1))
        if rate != self.sample_rate:
            wave = AF.resample(wave, rate, self.sample_rate)
        wave = wave[: self.num_samples]
        wave = torch.nn.functional.pad(wave, (0, self.num_samples - len(wave)))
        return wave.unsqueeze(0), self.labels[index]


def load_speechcommands(
    root: str | Path, subset: str, words: Sequence[str] | None = None, download: bool = False
) -> AudioClips:
    """One Speech Commands v2 subset (``training``/``validation``/``testing``) as 1 s clips at 16 kHz.

    ``words`` (default: all 35) selects the classes; a clip's label is its word's position in ``words``.
    """
    check_choice("subset", subset, ("training", "validation", "testing"))
    words = list(SPEECH_COMMANDS_WORDS if words is None else words)
    for word in words:
        check_choice("word", word, SPEECH_COMMANDS_WORDS)
    folder = Path(root) / "SpeechCommands" / "speech_commands_v0.02"
    how = "pass download=True or extract speech_commands_v0.02.tar.gz into " + str(folder)
    if download:
        SPEECHCOMMANDS(str(root), download=True)
    require_files("Speech Commands", [folder / "validation_list.txt", folder / "testing_list.txt"], how)
    ds = SPEECHCOMMANDS(str(root), subset=subset)
    paths, labels = [], []
    for n in range(len(ds)):
        relpath, _, label, _, _ = ds.get_metadata(n)
        if label in words:
            paths.append(Path(root) / "SpeechCommands" / relpath)
            labels.append(words.index(label))
    return AudioClips(paths, labels, sample_rate=16000, num_samples=16000)


def esc50_folder(root: str | Path) -> Path:
    """The ESC-50 folder (holding ``audio/`` and ``meta/esc50.csv``): ``root`` or ``root/ESC-50-master``."""
    candidates = (Path(root), Path(root) / "ESC-50-master")
    for folder in candidates:
        if (folder / "meta" / "esc50.csv").is_file():
            return folder
    raise DatasetNotFound("ESC-50", candidates[1] / "meta" / "esc50.csv", _ESC50_HOW)


def load_esc50(
    root: str | Path, test_fold: int = 5, sample_rate: int = 16000, classes: Sequence[int] | None = None
) -> tuple[AudioClips, AudioClips, tuple[str, ...]]:
    """ESC-50 as (train = the other four folds, test = ``test_fold``, class names), 5 s clips.

    ``classes`` (ESC-50 target ids, default all 50) selects classes, relabelled by position; the class
    names follow the same order.
    """
    check_int_range("test_fold", test_fold, 1, 5)
    folder = esc50_folder(root)
    with open(folder / "meta" / "esc50.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = {int(r["target"]): r["category"] for r in rows}
    classes = sorted(names) if classes is None else [int(c) for c in classes]
    for c in classes:
        check_choice("ESC-50 class", c, sorted(names))
    require_files(
        "ESC-50",
        [folder / "audio" / r["filename"] for r in rows if int(r["target"]) in classes],
        "the audio/ folder is incomplete; re-extract the ESC-50 archive",
    )
    splits = {True: ([], []), False: ([], [])}
    for r in rows:
        if int(r["target"]) in classes:
            paths, labels = splits[int(r["fold"]) == test_fold]
            paths.append(folder / "audio" / r["filename"])
            labels.append(classes.index(int(r["target"])))
    train, test = (AudioClips(*splits[side], sample_rate, 5 * sample_rate) for side in (False, True))
    return train, test, tuple(names[c] for c in classes)
