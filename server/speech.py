"""Speech: pyttsx3 driving espeak-ng, rendered to WAV bytes in memory on one dedicated thread.

Why a dedicated thread: ``pyttsx3.init()`` returns one cached engine per process and espeak-ng's
library keeps global state, so calls from several threads corrupt each other. All synthesis goes
through the speech `Lane` (one worker thread, bounded queue), so it never blocks the event loop and
never runs twice at once. Audio goes to a `BytesIO` handed to the espeak driver (it writes with
`wave.open`, which accepts file objects), so speech for a user's photo never touches the disk.
"""

from __future__ import annotations

import ctypes
import io
import re
import threading
import wave
from dataclasses import dataclass

from .errors import ApiError
from .lanes import Lane


@dataclass
class Audio:
    wav: bytes
    sample_rate: int
    duration_s: float
    voice: str


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    name: str
    languages: tuple[str, ...]


class SpeechUnavailableError(RuntimeError):
    pass


class Speech:
    """Text -> WAV with rate (words per minute), voice (id, name or language) and volume (0..1)."""

    def __init__(self, lane: Lane, default_voice: str, default_rate: int, default_volume: float) -> None:
        self.lane = lane
        self.default_voice = default_voice
        self.default_rate = default_rate
        self.default_volume = default_volume
        self._engine = None
        self._owner: threading.Thread | None = None
        self.voices: list[VoiceInfo] = []

    # --- worker-thread side -------------------------------------------------------------------
    def _init_engine(self):
        """Create the engine on the lane's thread (and only there)."""
        if self._engine is not None:
            assert threading.current_thread() is self._owner, "pyttsx3 engine used from a second thread"
            return self._engine
        try:
            import pyttsx3
            import pyttsx3.drivers.espeak as espeak_driver
        except ImportError as e:
            raise SpeechUnavailableError(f"pyttsx3 is not installed: {e}") from e
        # The driver prints "Audio saved to <...>" for every file; keep stdout (often a journal) quiet.
        espeak_driver.print = lambda *a, **k: None
        _fix_final_chunk(espeak_driver.EspeakDriver)
        try:
            engine = pyttsx3.init("espeak")
        except Exception as e:
            raise SpeechUnavailableError(
                f"espeak-ng is not usable ({e}); install it: apt-get install -y espeak-ng"
            ) from e
        self.voices = [VoiceInfo(v.id, v.name, tuple(v.languages or ())) for v in engine.getProperty("voices")]
        self._engine, self._owner = engine, threading.current_thread()
        return engine

    def resolve_voice(self, wanted: str) -> str:
        """A voice id for an id, a name or a language code ('en', 'en-us', 'fr'); 422 when unknown."""
        w = wanted.strip().lower()
        for v in self.voices:
            if v.id.lower() == w or v.name.lower() == w:
                return v.id
        for v in self.voices:
            if w in (lang.lower() for lang in v.languages) or v.id.lower().rsplit("/", 1)[-1] == w:
                return v.id
        base = w.split("-")[0]
        if base == "en":
            return self.resolve_voice("en-us") if w != "en-us" else self.voices[0].id
        for v in self.voices:
            if any(lang.lower().split("-")[0] == base for lang in v.languages):
                return v.id
        raise ApiError(422, "unknown_voice", f"No espeak-ng voice matches {wanted!r}; GET /v1/voices lists them.")

    def _render(self, text: str, rate: int, voice: str, volume: float) -> Audio:
        engine = self._init_engine()
        vid = self.resolve_voice(voice)
        # Rate and volume are set before *and* after the voice: measured with espeak-ng 1.51, a rate set only
        # after SetVoiceByName is ignored from the second utterance on (every answer came out at the first rate);
        # volume is a parameter of the same kind.
        params = (("rate", int(rate)), ("volume", float(volume)))
        for name, value in params:
            engine.setProperty(name, value)
        engine.setProperty("voice", vid)
        for name, value in params:
            engine.setProperty(name, value)
        for _attempt in range(2):
            buf = io.BytesIO()
            engine.save_to_file(text, buf)
            engine.runAndWait()
            data = buf.getvalue()
            if not data:
                continue
            with wave.open(io.BytesIO(data)) as w:
                rate_hz, frames = w.getframerate(), w.getnframes()
            if frames:
                return Audio(data, rate_hz, frames / rate_hz, vid)
        raise SpeechUnavailableError("espeak-ng produced no audio")

    def warm_up(self) -> None:
        """Runs on the lane: initialise the engine and list voices before the first request."""
        self._render("Ready.", self.default_rate, self.default_voice, self.default_volume)

    # --- event-loop side ------------------------------------------------------------------------
    async def speak(
        self,
        text: str,
        *,
        rate: int | None = None,
        voice: str | None = None,
        volume: float | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> Audio:
        text = speakable(text)
        if not text:
            raise ApiError(422, "empty_text", "There is no text to speak.")
        if self.voices and voice:
            self.resolve_voice(voice)  # fail fast with 422, before queueing
        return await self.lane.run(
            self._render,
            text,
            rate or self.default_rate,
            voice or self.default_voice,
            self.default_volume if volume is None else volume,
            cancel=cancel,
            timeout=timeout,
        )


def _fix_final_chunk(driver_cls) -> None:
    """pyttsx3 2.99's espeak callback writes the WAV when it sees the end-of-message event and only then
    appends that callback's samples, so the last chunk is lost (short utterances came back empty).
    Append the samples first, then let the original callback handle the events."""
    if getattr(driver_cls, "_rpiq_fixed", False):
        return
    original = driver_cls._onSynth

    def _on_synth(self, wav, numsamples, events):
        if self._speaking and numsamples > 0:
            self._data_buffer += ctypes.string_at(wav, numsamples * ctypes.sizeof(ctypes.c_short))
        return original(self, wav, 0, events)

    driver_cls._onSynth = _on_synth
    driver_cls._rpiq_fixed = True


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def speakable(text: str) -> str:
    """Strip control characters and markdown markers a screen reader would read out as symbols."""
    text = _CONTROL.sub(" ", text)
    text = re.sub(r"[*_`#>|]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n+")


class SentenceSplitter:
    """Feed streamed text; get whole sentences back as soon as they end (for speaking while generating)."""

    def __init__(self, min_chars: int = 12) -> None:
        self.buf = ""
        self.min_chars = min_chars

    def feed(self, delta: str) -> list[str]:
        self.buf += delta
        out = []
        while True:
            m = next((m for m in _SENTENCE_END.finditer(self.buf) if m.start() >= self.min_chars), None)
            if m is None:
                break
            sentence, self.buf = self.buf[: m.start()].strip(), self.buf[m.end() :]
            if sentence:
                out.append(sentence)
        return out

    def flush(self) -> list[str]:
        rest, self.buf = self.buf.strip(), ""
        return [rest] if rest else []
