"""Audio front ends (torchaudio): log-mel spectrogram and MFCC, for 16 kHz keyword clips by default.

Defaults follow common keyword-spotting practice: 25 ms windows every 10 ms (101 frames per second of
audio) and 40 mel bands. Logs are taken as ``log(mel + 1e-6)`` per element, so a clip's features do not
depend on the other clips in its batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torchaudio.transforms import MFCC, MelSpectrogram

from fwdgrad.data.errors import check_choice

FEATURE_KINDS = ("logmel", "mfcc", "waveform")


def _mel_kwargs(sample_rate: int, n_mels: int, win_ms: float, hop_ms: float) -> dict:
    win = int(round(sample_rate * win_ms / 1000))
    return dict(n_fft=win, win_length=win, hop_length=int(round(sample_rate * hop_ms / 1000)), n_mels=n_mels)


class _LogMel(nn.Module):
    def __init__(self, mel: MelSpectrogram) -> None:
        super().__init__()
        self.mel = mel

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(waveform) + 1e-6)


def log_mel_transform(
    sample_rate: int = 16000, n_mels: int = 40, win_ms: float = 25.0, hop_ms: float = 10.0
) -> nn.Module:
    """Waveform (..., T) -> log-mel spectrogram (..., n_mels, frames)."""
    return _LogMel(MelSpectrogram(sample_rate, **_mel_kwargs(sample_rate, n_mels, win_ms, hop_ms)))


def mfcc_transform(
    sample_rate: int = 16000, n_mfcc: int = 13, n_mels: int = 40, win_ms: float = 25.0, hop_ms: float = 10.0
) -> MFCC:
    """Waveform (..., T) -> MFCC (..., n_mfcc, frames), DCT of the log-mel spectrogram above."""
    return MFCC(
        sample_rate, n_mfcc=n_mfcc, log_mels=True, melkwargs=_mel_kwargs(sample_rate, n_mels, win_ms, hop_ms)
    )


def compute_features(
    waveforms: torch.Tensor, kind: str = "logmel", sample_rate: int = 16000, batch_size: int = 512
) -> torch.Tensor:
    """Features of waveforms (N,1,T): ``logmel`` (N,1,40,F), ``mfcc`` (N,1,13,F) or the waveforms."""
    check_choice("feature kind", kind, FEATURE_KINDS)
    if kind == "waveform":
        return waveforms
    transform = log_mel_transform(sample_rate) if kind == "logmel" else mfcc_transform(sample_rate)
    with torch.no_grad():
        return torch.cat([transform(chunk) for chunk in waveforms.split(batch_size)])
