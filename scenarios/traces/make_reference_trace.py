"""Make ``scenarios/traces/moesim-reference``: routing of moesim's own trained reference MoE.

    python scenarios/traces/make_reference_trace.py

Trains the reference MoE (moesim/model/reference.py) of the ``moesim-reference`` preset
(scenarios/models/moesim-reference.yaml: d_model 192, 4 MoE layers of 32 SwiGLU experts,
top-4, Switch auxiliary balance loss) on CPU on the bytes of Python's standard library,
then captures its routing on 32,768 held-out bytes (text after the training corpus) and
writes the trace. Deterministic for the seed on one machine; takes a few minutes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import torch  # noqa: E402

from moesim.model.capture import capture_reference  # noqa: E402
from moesim.model.reference import MoEConfig  # noqa: E402
from moesim.model.train import DEFAULT_CORPUS_BYTES, load_corpus, train_reference  # noqa: E402

CONFIG = MoEConfig(d_model=192, n_layers=4, n_heads=4, n_experts=32, top_k=4, expert_d_ff=128)
STEPS, BATCH, SEQ, SEED = 400, 16, 128, 0
CAPTURE_TOKENS = 32_768


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = train_reference(
        CONFIG, steps=STEPS, batch_size=BATCH, seq_len=SEQ, seed=SEED, balance="aux"
    )
    train_s = time.perf_counter() - t0
    corpus = load_corpus(DEFAULT_CORPUS_BYTES + CAPTURE_TOKENS)
    held_out = corpus[DEFAULT_CORPUS_BYTES:].to(torch.long)
    if held_out.numel() < CAPTURE_TOKENS:
        sys.exit("not enough held-out text")
    ids = held_out[:CAPTURE_TOKENS].reshape(-1, SEQ)  # (256, 128)
    tail = 10 * STEPS // 100
    meta = {
        "model": "moesim-reference",
        "trained": {
            "steps": STEPS,
            "batch_size": BATCH,
            "seq_len": SEQ,
            "seed": SEED,
            "balance": "aux",
            "corpus": "Python stdlib .py bytes",
            "final_lm_loss": float(sum(result.lm_loss[-tail:]) / tail),
            "final_balance_ratio": float(sum(result.balance_ratio[-tail:]) / tail),
            "train_s": round(train_s, 1),
            "torch": torch.__version__,
        },
        "captured_on": f"{CAPTURE_TOKENS} held-out bytes after the training corpus",
    }
    capture_reference(result.model, ids, HERE / "moesim-reference", meta=meta)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
