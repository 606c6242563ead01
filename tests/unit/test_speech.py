"""Text to speech: eSpeak NG through ctypes, streamed into a 128 kbps MP3."""

from __future__ import annotations

import io
import threading
import tracemalloc

import mutagen.mp3
import pytest

from tasks.speech import SAMPLE_RATE, synthesize_mp3

PASSAGE = (
    "It was the best of times, it was the worst of times, it was the age of "
    "wisdom, it was the age of foolishness, it was the epoch of belief, it was "
    "the epoch of incredulity, it was the season of Light, it was the season "
    "of Darkness. "
)


def _decode(data: bytes) -> mutagen.mp3.MPEGInfo:
    return mutagen.mp3.MP3(io.BytesIO(data)).info


def test_speech_is_a_128_kbps_mono_mp3_as_long_as_the_spoken_text() -> None:
    out = io.BytesIO()
    result = synthesize_mp3(PASSAGE, out)
    info = _decode(out.getvalue())
    assert (info.bitrate, info.sample_rate, info.channels) == (128_000, SAMPLE_RATE, 1)
    assert result.mp3_bytes == len(out.getvalue())
    assert info.length == pytest.approx(result.duration_seconds, abs=0.2)
    # 49 words at 175 words per minute: about 17 s of speech.
    assert 8 < result.duration_seconds < 30
    assert not out.getvalue().startswith(b"RIFF")  # never WAV


def test_speed_changes_the_length_of_the_speech() -> None:
    slow = synthesize_mp3(PASSAGE, io.BytesIO(), rate_wpm=120)
    fast = synthesize_mp3(PASSAGE, io.BytesIO(), rate_wpm=350)
    assert fast.duration_seconds < slow.duration_seconds * 0.6


def test_voice_is_selectable_and_an_unknown_voice_is_refused() -> None:
    spoken = {}
    for voice in ("en-us", "en-gb", "de", "English (Scotland)"):
        out = io.BytesIO()
        synthesize_mp3("Guten Tag, wie geht es Ihnen?", out, voice=voice)
        spoken[voice] = out.getvalue()
    assert len(set(spoken.values())) == 4
    with pytest.raises(ValueError, match="no voice named"):
        synthesize_mp3("hello", io.BytesIO(), voice="no-such-voice")
    with pytest.raises(ValueError, match="outside"):
        synthesize_mp3("hello", io.BytesIO(), rate_wpm=5)


class _CountingWriter(io.RawIOBase):
    """A sink that counts the writes and passes the bytes on to a file (not
    to memory: the test measures what the synthesis itself holds)."""

    def __init__(self, file) -> None:
        super().__init__()
        self.writes = 0
        self.largest = 0
        self.file = file

    def writable(self) -> bool:
        return True

    def write(self, chunk) -> int:
        self.writes += 1
        self.largest = max(self.largest, len(chunk))
        return self.file.write(chunk)


def test_a_long_chapter_is_encoded_as_it_is_spoken_not_held_as_pcm(tmp_path) -> None:
    chapter = PASSAGE * 30  # about 1,500 words, ten minutes of speech
    with open(tmp_path / "chapter.mp3", "w+b") as file:
        sink = _CountingWriter(file)
        tracemalloc.start()
        try:
            result = synthesize_mp3(chapter, sink)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        file.seek(0)
        data = file.read()
    assert result.duration_seconds > 300
    # Ten minutes of PCM is 26 MB, of MP3 9.6 MB: the synthesis held neither,
    # and the encoder's output arrived a buffer at a time.
    assert peak < 4 * 1024 * 1024, f"{peak / 2**20:.1f} MiB held while speaking"
    assert sink.writes > 1000
    assert sink.largest < 64 * 1024
    assert _decode(data).length == pytest.approx(result.duration_seconds, abs=0.2)


def test_threads_speaking_at_once_each_get_their_own_audio() -> None:
    texts = ["One two three four five.", PASSAGE]
    outputs = [io.BytesIO(), io.BytesIO()]
    results: list = [None, None]

    def speak(index: int) -> None:
        results[index] = synthesize_mp3(texts[index], outputs[index])

    threads = [threading.Thread(target=speak, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index in range(2):
        assert _decode(outputs[index].getvalue()).length == pytest.approx(
            results[index].duration_seconds, abs=0.2
        )
    assert results[0].duration_seconds < results[1].duration_seconds / 4
