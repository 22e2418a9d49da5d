"""How likely a llama.cpp model finds one continuation after each of several contexts.

This is lm-evaluation-harness's `loglikelihood` request, served for many contexts at once: every
(context + continuation) is one sequence of a single `llama_decode` batch (llama.h's multi-sequence
batch, a unified KV cache cleared before each), and logits are computed only where they are read, at
the positions that predict the continuation's tokens. The result per context is the mean natural-log
probability of the continuation's tokens.

The router asks it which evidence sentence a question was written about ("Passage: … Question: <the
question>", as in unsupervised passage re-ranking, Sachan et al. 2022): a reader's judgement the
embedding scorer cannot make. It runs on its own llama.cpp context beside the generation contexts,
through the library's low-level binding of llama.h (the high-level `Llama` object holds one sequence).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fabric.errors import InvalidArgument
from generator.backends.base import Likelihoods

if TYPE_CHECKING:
    import numpy as np

#: Sequences read in one decode, and tokens in one decode (their total).
MAX_SEQUENCES = 16
MAX_TOKENS = 2048


class LlamaLikelihood:
    """One llama.cpp context for scoring; `score` blocks (call it from a worker thread), one at a time."""

    def __init__(self, model_path: Path, threads: int):
        self.model_path = model_path
        self.threads = threads
        self._lock = threading.Lock()
        self._model = self._ctx = self._batch = None

    def load(self) -> None:
        import llama_cpp as L

        # llama.cpp logs every tensor it loads through llama-cpp-python's logger: errors only, as Llama(verbose=False).
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

        model_params = L.llama_model_default_params()
        model = L.llama_model_load_from_file(str(self.model_path).encode(), model_params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.model_path}")
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = MAX_TOKENS
        params.n_ubatch = 512
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True  # the sequences share the cache: any mix of lengths up to MAX_TOKENS fits
        params.n_threads = params.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(model, params)
        if not ctx:
            L.llama_model_free(model)
            raise RuntimeError("llama.cpp could not create a scoring context")
        self._model, self._ctx = model, ctx
        self._vocab = L.llama_model_get_vocab(model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._batch = L.llama_batch_init(MAX_TOKENS, 0, MAX_SEQUENCES)

    def close(self) -> None:
        import llama_cpp as L

        with self._lock:
            if self._batch is not None:
                L.llama_batch_free(self._batch)
            if self._ctx:
                L.llama_free(self._ctx)
            if self._model:
                L.llama_model_free(self._model)
            self._model = self._ctx = self._batch = None

    def tokenize(self, text: str, bos: bool) -> list[int]:
        import llama_cpp as L

        raw = text.encode()
        buffer = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self._vocab, raw, len(raw), buffer, len(buffer), bos, True)
        if n < 0:
            raise InvalidArgument("contexts", "a text could not be tokenized")
        return list(buffer[:n])

    def score(self, contexts: list[str], continuation: str) -> Likelihoods:
        import numpy as np  # with llama_cpp: loaded when the model is, not when the settings are read

        if self._ctx is None:
            raise RuntimeError("the scoring context is not loaded")
        after = self.tokenize(continuation, bos=False)
        if not after:
            raise InvalidArgument("continuation", "must hold at least one token")
        sequences = [self.tokenize(context, bos=True) + after for context in contexts]
        for i, tokens in enumerate(sequences):
            if len(tokens) > MAX_TOKENS:
                raise InvalidArgument(f"contexts[{i}]", f"{len(tokens)} tokens with the continuation; at most {MAX_TOKENS}")
        totals = np.zeros(len(sequences))
        with self._lock:
            start = 0
            while start < len(sequences):  # as many sequences per decode as fit
                end, used = start, 0
                while end < len(sequences) and end - start < MAX_SEQUENCES and used + len(sequences[end]) <= MAX_TOKENS:
                    used += len(sequences[end])
                    end += 1
                totals[start:end] = self._decode(sequences[start:end], len(after))
                start = end
        return Likelihoods([float(t) / len(after) for t in totals], len(after), sum(map(len, sequences)))

    def _decode(self, sequences: list[list[int]], n_after: int) -> np.ndarray:
        import llama_cpp as L
        import numpy as np

        batch, read = self._batch, []  # (sequence, batch row, the token that row predicts)
        batch.n_tokens = 0
        for s, tokens in enumerate(sequences):
            first = len(tokens) - n_after - 1  # the row that predicts the continuation's first token
            for position, token in enumerate(tokens):
                row = batch.n_tokens
                batch.token[row], batch.pos[row], batch.n_seq_id[row] = token, position, 1
                batch.seq_id[row][0] = s
                wanted = first <= position < len(tokens) - 1
                batch.logits[row] = wanted
                if wanted:
                    read.append((s, row, tokens[position + 1]))
                batch.n_tokens += 1
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        if (code := L.llama_decode(self._ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        logits = np.empty((len(read), self._n_vocab), dtype=np.float32)
        for k, (_, row, _) in enumerate(read):
            ctypes.memmove(logits[k].ctypes.data, L.llama_get_logits_ith(self._ctx, row), self._n_vocab * 4)
        peak = logits.max(axis=1)
        log_norm = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
        picked = logits[np.arange(len(read)), [token for _, _, token in read]] - log_norm
        totals = np.zeros(len(sequences))
        np.add.at(totals, [s for s, _, _ in read], picked)
        return totals
