"""Continuous batching: one engine thread runs the model for every live request.

Each turn of the loop, between model steps:
1. cancelled requests (a client went away) leave, and waiting ones join while the batch has room
   (`max_batch`); beyond that a bounded queue (`max_queue`) waits, and a full queue is refused at
   once (`QueueFull`, which the HTTP layer answers with 503 and Retry-After) rather than hanging;
2. one sequence that still has prompt left prefills one chunk (`prefill_chunk` tokens), its KV
   prefix taken from the prompt cache where an earlier request shared it, so a long prompt never
   stalls the others' decoding for more than a chunk (the fused batch below prefills several
   sequences' prompts per turn, up to `prefill_chunk` tokens in all, so that requests arriving
   together join it together);
3. every decoding sequence advances one token in **one** model call: a sequence alone keeps the
   single-sequence path (the compiled decode step, custom kernels on a GPU); two or more are
   merged into a left-padded batched KV cache (`engine.batch`) and run as one (B, 1) step.
   Each row samples with its own parameters and stops by its own rules.

Where the fused step runs (CUDA; Metal with FOUNDRY_FUSED=1; Qwen2/Llama, quantized), every
decoding sequence, alone or not, is a row of one `BatchedFusedDecoder` instead (engine/batch_decoder.py:
about the single-sequence step's graph nodes for any B, tokens sampled on the device). A sequence
joins it after its prefill and leaves when it finishes; the step after the current one is queued
before the current tokens go to the host (FOUNDRY_DECODE_AHEAD, default 4), and drained before any
join or leave, so that neither races a step in flight.

`batched=False` runs the same turn as one single-sequence step per live sequence instead (the
`auto` choice on MLX's CPU backend): there a batched step costs B single steps or more, since
its matmuls are compute-bound (measured on the 2-core CI machine: a (8, 896) x 9728 quantized
matmul takes 8-10x the time of one row; a B=8 step of the 0.5B model 6.5 s against 0.57 s for
B=1), so batching cannot add throughput and interleaving keeps every stream moving at the same
aggregate rate. On a GPU a step is bound by reading the weights, which B rows share.

The batch is rebuilt only when its membership changes; a finished sequence's KV goes to the
prompt cache. Everything that touches MLX runs on this one thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import mlx.core as mx

from ..engine import batch as batching
from ..engine.batch_decoder import BatchedFusedDecoder, batch_decoder_for
from ..engine.decoder import decode_ahead, decoder_for
from ..engine.prefill import prefill
from ..engine.sampling import _fresh_seed
from .prompt_cache import PromptCache
from .sequence import Event, GenerationRequest, LiveSequence

log = logging.getLogger("foundry_mlx.server")


class QueueFull(Exception):
    """Every batch slot and queue place is taken."""


class Ticket:
    """The caller's handle on a submitted request."""

    def __init__(self, scheduler: Scheduler, sequence: LiveSequence) -> None:
        self._scheduler, self._sequence = scheduler, sequence

    def cancel(self) -> None:
        """Free the request's slot at the next step boundary (the client went away)."""
        if not self._sequence.finished:  # a finished one keeps its KV for the prompt cache
            self._sequence.cancelled = True
            self._scheduler._wake()


class Scheduler:
    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        max_queue: int = 32,
        prompt_cache: PromptCache | None = None,
        prefill_chunk: int = 512,
        batched: bool = True,
        fused: BatchedFusedDecoder | None | str = "auto",
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prompt_cache = prompt_cache
        self.prefill_chunk = prefill_chunk
        self.batched = batched
        # "auto": the fused batch where the backend and the model allow it (not with batching off).
        self.fused = (batch_decoder_for(model) if batched else None) if fused == "auto" else fused
        self._queued: deque[mx.array] = deque()  # fused steps queued ahead, not yet read
        # How many: FOUNDRY_DECODE_AHEAD, as for `stream_generate` (one ahead hides the host's read;
        # more hide the Python of accepting B rows' tokens too).
        self.ahead = decode_ahead(4)
        self._waiting: deque[LiveSequence] = deque()
        self._live: list[LiveSequence] = []
        self._batch_rows: list[LiveSequence] = []
        self._batch: list[batching.BatchKVCache] | None = None
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.batched_steps = 0
        self.max_rows_seen = 0
        # Seconds the engine thread spent per kind of work (GET /health shows them): prefill, batch
        # membership changes (drain, join, leave), decode steps (queueing, waiting, accepting).
        self.seconds = {"prefill": 0.0, "membership": 0.0, "decode": 0.0}

    # --- the caller's side (HTTP threads) ---------------------------------------------------------

    def start(self) -> None:
        # MLX streams belong to threads: arrays the model built lazily on this thread (RoPE
        # tables...) must be computed here before the engine thread may use them.
        mx.eval(self.model(mx.array([[0]])))
        self._thread = threading.Thread(target=self._run, name="foundry-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Ticket:
        """Queue `request`; `emit` gets its events on the engine thread. Raises QueueFull."""
        sequence = LiveSequence(request, self.tokenizer, emit)
        with self._condition:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(sequence)
            self._condition.notify_all()
        return Ticket(self, sequence)

    @property
    def load(self) -> dict[str, int]:
        with self._condition:
            return {"live": len(self._live), "waiting": len(self._waiting)}

    def _wake(self) -> None:
        with self._condition:
            self._condition.notify_all()

    # --- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
                self._live = [s for s in self._live if not (s.cancelled or s.finished)]
                while self._waiting and len(self._live) < self.max_batch:
                    self._live.append(self._waiting.popleft())
                if self._stopping:
                    return
                if not self._live:
                    mx.clear_cache()  # idle: hand MLX's cached buffers back to the system
                    self._condition.wait()
                    continue
                live = list(self._live)
                alone = len(live) == 1 and not self._waiting
            try:
                self._turn(live, alone)
            except Exception as error:  # a bug: fail these requests, keep serving the next ones
                log.exception("engine step failed")
                for sequence in live:
                    if not sequence.finished:
                        sequence.fail(f"The engine failed on this request ({type(error).__name__}); see the server log.")
                self._batch, self._batch_rows = None, []
                if self.fused is not None:
                    self.fused.clear()
                    self._queued.clear()
                mx.clear_cache()

    def _turn(self, live: list[LiveSequence], alone: bool) -> None:
        if self.fused is not None:
            self._fused_turn(live)
            return
        for sequence in live:
            if sequence.speculative is not None and not (alone and sequence.decoding):
                self._resolve(sequence)  # others arrived: the step queued ahead becomes an ordinary one
        clock = time.perf_counter()
        prefilling = next((s for s in live if not s.started or s.prompt_left), None)
        if prefilling is not None:
            self._prefill(prefilling)
        clock = self._count("prefill", clock)
        decoding = [s for s in live if s.decoding]
        self._sync_batch(decoding)
        if alone and len(decoding) == 1:
            self._decode_ahead(decoding[0])
        elif decoding:
            self._decode(decoding)
        self._count("decode", clock)
        for sequence in live:
            if sequence.finished and sequence.cache is not None and sequence not in self._batch_rows:
                self._retire(sequence)

    def _prefill(self, sequence: LiveSequence, limit: int | None = None) -> int:
        """One chunk of `sequence`'s prompt (at most `limit` tokens); returns its length."""
        if not sequence.started:
            hit = self.prompt_cache.lookup(sequence.request.ids, self.model) if self.prompt_cache else None
            cache, cached = hit if hit is not None else (self.model.make_cache(), 0)
            sequence.start(cache, sequence.request.ids[:cached])
        chunk = sequence.prompt_left[: min(self.prefill_chunk, limit or self.prefill_chunk)]
        logits = prefill(self.model, chunk, sequence.cache)
        sequence.tokens.extend(chunk)
        if sequence.prompt_left:
            mx.eval([[c.keys, c.values] for c in sequence.cache])
            return len(chunk)
        token = sequence.sample(logits)
        sequence.accept(_read(token)[0])
        return len(chunk)

    def _sync_batch(self, decoding: list[LiveSequence]) -> None:
        """Give the rows of a batch whose membership changed their own caches back."""
        if self._batch is not None and self._batch_rows != decoding:
            for sequence, cache in zip(self._batch_rows, batching.split(self._batch, self.model)):
                sequence.cache = cache
            self._batch, self._batch_rows = None, []

    def _decode(self, decoding: list[LiveSequence]) -> None:
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(decoding))
        if len(decoding) == 1 or not self.batched:
            decode = decoder_for(self.model)
            rows = [decode(mx.array([s.pending]), s.cache) for s in decoding]
        else:
            if self._batch is None:
                self._batch = batching.merge([s.cache for s in decoding], reserve=self._reserve(decoding))
                self._batch_rows = list(decoding)
                for sequence in decoding:
                    sequence.cache = None  # the batch holds it now
            self.batched_steps += 1
            tokens = mx.array([[s.pending] for s in decoding])
            logits = self.model(tokens, self._batch, last_only=True)[:, -1, :]
            rows = [logits[i : i + 1] for i in range(len(decoding))]
        chosen = mx.concatenate([s.sample(row) for s, row in zip(decoding, rows)])
        mx.eval(chosen)
        for sequence, token in zip(decoding, chosen.tolist()):
            sequence.fed()
            sequence.accept(token)
        if any(s.finished or s.cancelled for s in decoding):
            self._sync_batch([s for s in decoding if s.decoding])

    def _decode_ahead(self, sequence: LiveSequence) -> None:
        """One sequence alone: as `stream_generate` does, queue step n+1 (`mx.async_eval`) before
        token n goes to the host, so that building and launching the next step overlap the device's
        work. A step queued past the last token is dropped (its cache position is never used)."""
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, 1)
        decode = decoder_for(self.model)
        current = sequence.speculative
        if current is None:
            current = sequence.sample(decode(mx.array([sequence.pending]), sequence.cache))
        sequence.speculative = None
        if sequence.generated + 1 < sequence.request.max_tokens:
            recent = sequence.recent
            if recent is not None:
                recent = mx.concatenate([recent, current])[-sequence.request.sampling.repetition_context :]
            sequence.speculative = sequence.sample(decode(current, sequence.cache), recent)
            mx.async_eval(sequence.speculative)
        value = _read(current)[0]
        sequence.fed()
        sequence.accept(value)
        if sequence.finished:
            sequence.speculative = None

    def _resolve(self, sequence: LiveSequence) -> None:
        """Finish the step queued ahead for `sequence`: it fed the pending token and sampled the next."""
        value = _read(sequence.speculative)[0]
        sequence.speculative = None
        sequence.fed()
        sequence.accept(value)

    # --- the fused batch ------------------------------------------------------------------------

    def _fused_turn(self, live: list[LiveSequence]) -> None:
        clock = time.perf_counter()
        # Prompts up to `prefill_chunk` tokens in all per turn (at least one chunk): requests that
        # arrive together start together, and join the batch with one drain and one relayout.
        budget = self.prefill_chunk
        for sequence in [s for s in live if not s.started or s.prompt_left]:
            if budget <= 0:
                break
            budget -= self._prefill(sequence, budget)
        clock = self._count("prefill", clock)
        decoding = [s for s in live if s.decoding]
        members = self.fused.members
        if any(s not in members for s in decoding) or any(s not in decoding for s in members):
            self._drain()
            self._leave_finished()
            joining = [s for s in decoding if s not in self.fused.members]
            if joining:
                self.fused.make_room(len(joining), joining[0].cache[0].keys.dtype,
                                     max(s.cache[0].offset + self._room(s) for s in joining))
            for sequence in joining:
                self._join(sequence)
        clock = self._count("membership", clock)
        if self.fused.members:
            self._fused_step()
        self._count("decode", clock)
        for sequence in live:
            if sequence.finished and sequence.cache is not None:
                self._retire(sequence)

    def _join(self, sequence: LiveSequence) -> None:
        sampling = sequence.request.sampling
        seed = sampling.seed if sampling.seed is not None else _fresh_seed()
        self.fused.join(sequence, sequence.cache, sequence.pending, sequence.tokens + [sequence.pending], sampling,
                        seed, self._room(sequence))
        sequence.cache = None  # the batch holds its positions now
        sequence.recent = None  # the device keeps the penalty's ring

    @staticmethod
    def _room(sequence: LiveSequence) -> int:
        """Positions a joining sequence reserves past its current one: the rest of its reply (to 1024)."""
        return min(sequence.request.max_tokens - sequence.generated, 1024) + 2

    def _fused_step(self) -> None:
        members = self.fused.members
        self.steps += 1
        self.batched_steps += len(members) > 1
        self.max_rows_seen = max(self.max_rows_seen, len(members))
        # Queue steps ahead (tokens and sampling stay on the device) while some row still needs
        # them; a row that stops meanwhile wastes its share of the steps already queued.
        useful = max(s.request.max_tokens - s.generated for s in members)
        while len(self._queued) < min(self.ahead, useful):
            self._queued.append(self.fused.advance())
            mx.async_eval(self._queued[-1])
        self._accept(_read(self._queued.popleft()))
        if any(not s.decoding for s in self.fused.members):
            self._drain()
            self._leave_finished()

    def _accept(self, tokens: list[int]) -> None:
        for sequence, token in zip(self.fused.rows, tokens):
            if sequence is not None and sequence.decoding:
                sequence.fed()
                sequence.accept(token)

    def _drain(self) -> None:
        """Read the steps queued ahead: each fed every row's pending token and sampled the next."""
        while self._queued:
            self.steps += 1
            self._accept(_read(self._queued.popleft()))

    def _leave_finished(self) -> None:
        for sequence in self.fused.members:
            if sequence.finished:  # its positions go back to it (the prompt cache keeps them)
                sequence.cache = self.fused.leave(sequence, length=len(sequence.tokens))
            elif sequence.cancelled:
                self.fused.leave(sequence)

    def _count(self, kind: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[kind] += now - since
        return now

    @staticmethod
    def _reserve(decoding: list[LiveSequence]) -> int:
        # Room for the longest remaining reply, so the merged buffer rarely grows.
        return min(max(s.request.max_tokens - s.generated for s in decoding), 256) + 1

    def _retire(self, sequence: LiveSequence) -> None:
        if self.prompt_cache is not None and sequence.cache is not None and not sequence.cancelled:
            self.prompt_cache.store(sequence.tokens, sequence.cache)
        sequence.cache = None


def _read(tokens: mx.array) -> list[int]:
    """Token ids to the host. `mx.eval` first: it waits for the device with the GIL released, where
    `tolist()` and `item()` hold it while they wait, starving the HTTP threads of the interpreter
    for the length of every step queued ahead."""
    mx.eval(tokens)
    return tokens.tolist()


def wait_until_idle(scheduler: Scheduler, timeout: float = 10.0) -> bool:
    """True once nothing is live or waiting (tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scheduler.load == {"live": 0, "waiting": 0}:
            return True
        time.sleep(0.01)
    return False
