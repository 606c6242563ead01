"""Text to speech: eSpeak NG, driven through ctypes, straight into an MP3 encoder.

The ``espeakng-loader`` wheel ships ``libespeak-ng.so`` and its voice data. We
run eSpeak in synchronous mode: ``espeak_Synth`` calls our callback with short
buffers of 16-bit mono PCM at 22050 Hz, and each buffer goes straight into a
``lameenc`` encoder (128 kbps, mono, 22050 Hz) whose MP3 bytes are written to
the caller's file. No PCM is kept: however long the chapter, memory holds one
eSpeak buffer and the MP3 written so far lives in the caller's file.

eSpeak keeps global state and is not thread-safe, so one lock per process
serialises synthesis; a prefork worker runs one synthesis per child process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import BinaryIO

import espeakng_loader
import lameenc

log = logging.getLogger(__name__)

SAMPLE_RATE = 22050  # what eSpeak NG produces
BIT_RATE_KBPS = 128
DEFAULT_VOICE = "en-us"
DEFAULT_RATE_WPM = 175
MIN_RATE_WPM, MAX_RATE_WPM = 80, 450  # espeakRATE_MINIMUM / espeakRATE_MAXIMUM
CONTENT_TYPE = "audio/mpeg"

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_EE_OK = 0
# Milliseconds of audio per callback: small buffers keep memory flat.
_BUFFER_MS = 200

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Voice(ctypes.Structure):
    """speak_lib.h's espeak_VOICE."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),  # priority byte, then language, NUL-separated
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


class SpeechError(RuntimeError):
    """eSpeak NG could not be loaded or could not speak the text."""


@dataclass(frozen=True)
class SpeechResult:
    """What one synthesis wrote: MP3 size and the speech's length."""

    samples: int
    mp3_bytes: int

    @property
    def duration_seconds(self) -> float:
        return self.samples / SAMPLE_RATE


class _Sink:
    """Receives eSpeak's PCM buffers for the synthesis in progress."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.encoder = _new_encoder()
        self.samples = 0
        self.mp3_bytes = 0
        self.error: BaseException | None = None

    def feed(self, pcm: bytes, samples: int) -> None:
        self.write(self.encoder.encode(pcm))
        self.samples += samples

    def finish(self) -> None:
        self.write(self.encoder.flush())

    def write(self, chunk: bytes) -> None:
        if chunk:
            self.out.write(chunk)
            self.mp3_bytes += len(chunk)


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_initialized_pid: int | None = None
_languages: frozenset[str] = frozenset()
_sink: _Sink | None = None


@_SYNTH_CALLBACK
def _on_audio(wav, numsamples, events) -> int:  # noqa: ARG001 - eSpeak's signature
    sink = _sink
    if sink is None or sink.error is not None:
        return 1  # abort: nobody is listening
    if numsamples > 0 and wav:
        try:
            sink.feed(ctypes.string_at(wav, numsamples * 2), numsamples)
        except BaseException as exc:  # an exception must not cross into C
            sink.error = exc
            return 1
    return 0


def _new_encoder() -> lameenc.Encoder:
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(BIT_RATE_KBPS)
    encoder.set_in_sample_rate(SAMPLE_RATE)
    encoder.set_out_sample_rate(SAMPLE_RATE)
    encoder.set_channels(1)
    encoder.set_quality(5)  # LAME's "good, fast" preset
    return encoder


def _espeak() -> ctypes.CDLL:
    """The library, initialised once per process (again in a forked child)."""
    global _library, _initialized_pid, _languages
    if _library is not None and _initialized_pid == os.getpid():
        return _library
    try:
        library = ctypes.CDLL(espeakng_loader.get_library_path())
    except OSError as exc:
        raise SpeechError(
            f"cannot load eSpeak NG from {espeakng_loader.get_library_path()} ({exc}); "
            "reinstall the espeakng-loader package"
        ) from exc
    library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.espeak_Initialize.restype = ctypes.c_int
    library.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    library.espeak_SetSynthCallback.restype = None
    library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    library.espeak_SetVoiceByName.restype = ctypes.c_int
    library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.espeak_SetParameter.restype = ctypes.c_int
    library.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]
    library.espeak_Synth.restype = ctypes.c_int
    library.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
    library.espeak_SetVoiceByProperties.restype = ctypes.c_int
    library.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    library.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    data_path = espeakng_loader.get_data_path().encode()
    rate = library.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data_path, 0)
    if rate != SAMPLE_RATE:
        raise SpeechError(f"eSpeak NG failed to initialise (returned {rate}, data at {data_path!r})")
    library.espeak_SetSynthCallback(_on_audio)
    _library, _initialized_pid = library, os.getpid()
    _languages = frozenset(_list_languages(library))
    log.debug("eSpeak NG initialised at %d Hz in pid %d", rate, _initialized_pid)
    return library


def _list_languages(library: ctypes.CDLL) -> list[str]:
    languages = []
    voices = library.espeak_ListVoices(None)
    index = 0
    while voices[index]:
        spec = voices[index].contents.languages or b""
        languages.append(spec[1:].split(b"\0", 1)[0].decode().lower())
        index += 1
    return languages


def _select_voice(library: ctypes.CDLL, voice: str) -> None:
    """A voice by name (``en-us``, ``de``, ``English (Great Britain)``) or by
    language code (``en-gb``, ``fr-fr``)."""
    if library.espeak_SetVoiceByName(voice.encode()) == _EE_OK:
        return
    if voice.lower() in _languages:
        spec = _Voice(languages=voice.lower().encode())
        if library.espeak_SetVoiceByProperties(ctypes.byref(spec)) == _EE_OK:
            return
    raise ValueError(f"eSpeak NG has no voice named {voice!r} (try en-us, en-gb, de, fr-fr)")


def check_voice(voice: str) -> None:
    """Raise ValueError unless eSpeak NG has ``voice`` (name or language code)."""
    with _lock:
        _select_voice(_espeak(), voice)


def synthesize_mp3(
    text: str,
    out: BinaryIO,
    voice: str = DEFAULT_VOICE,
    rate_wpm: int = DEFAULT_RATE_WPM,
) -> SpeechResult:
    """Speak ``text`` with eSpeak NG and write it to ``out`` as MP3.

    ``voice`` is an eSpeak voice name (``en-us``, ``en-gb``, ``de``, ``fr`` …),
    ``rate_wpm`` the speed in words per minute (80–450).
    """
    global _sink
    if not text.strip():
        raise ValueError("nothing to speak: the text is empty")
    if not MIN_RATE_WPM <= rate_wpm <= MAX_RATE_WPM:
        raise ValueError(f"speed {rate_wpm} wpm is outside {MIN_RATE_WPM}–{MAX_RATE_WPM}")
    encoded = text.encode("utf-8")
    sink = _Sink(out)
    with _lock:
        library = _espeak()
        _select_voice(library, voice)
        library.espeak_SetParameter(_ESPEAK_RATE, rate_wpm, 0)
        _sink = sink
        try:
            status = library.espeak_Synth(
                encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
            )
        finally:
            _sink = None
    if sink.error is not None:
        raise SpeechError(f"MP3 encoding failed: {sink.error}") from sink.error
    if status != _EE_OK:
        raise SpeechError(f"eSpeak NG could not speak the text (status {status})")
    sink.finish()
    return SpeechResult(samples=sink.samples, mp3_bytes=sink.mp3_bytes)
