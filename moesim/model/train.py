"""Train the reference MoE on CPU on a real offline corpus: Python's own standard library.

The corpus is the bytes of the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
(installed packages excluded), read in sorted path order up to a byte budget, so the
same Python version gives the same corpus with no download. Tokens are bytes (vocab 256).

:func:`train_reference` records, per step, the language-model loss, the expert-load
balance ratio (max / mean of the assignments per expert, averaged over MoE layers) and
the mean squared router logit; it can save a checkpoint that :func:`load_reference`
reads back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sysconfig
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from moesim.errors import InputError
from moesim.fileio import atomic_write
from moesim.model.reference import MoEConfig, MoELM, MoEOutput

__all__ = [
    "BALANCE_TERMS",
    "CHECKPOINT_FORMAT",
    "DEFAULT_AUX_LOSS_COEF",
    "DEFAULT_BIAS_UPDATE_RATE",
    "DEFAULT_CORPUS_BYTES",
    "DEFAULT_DEVICE_LOSS_COEF",
    "DEFAULT_Z_LOSS_COEF",
    "StepStats",
    "TrainResult",
    "balance_config",
    "load_corpus",
    "load_reference",
    "train_reference",
]

CHECKPOINT_FORMAT = "moesim.reference/1"
DEFAULT_CORPUS_BYTES = 4_000_000
# Coefficients used when ``balance`` enables a term the config leaves at zero.
DEFAULT_AUX_LOSS_COEF = 0.01  # Switch Transformer (arXiv 2101.03961, sec. 2.2)
DEFAULT_Z_LOSS_COEF = 1e-3  # ST-MoE (arXiv 2202.08906, sec. 3.1)
DEFAULT_DEVICE_LOSS_COEF = 0.05  # DeepSeek-V2 alpha_2 (arXiv 2405.04434, sec. 3.1.2)
DEFAULT_BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3 gamma (arXiv 2412.19437, sec. 4.2)
# balance term -> (config field, default coefficient)
BALANCE_TERMS: dict[str, tuple[str, float]] = {
    "aux": ("aux_loss_coef", DEFAULT_AUX_LOSS_COEF),
    "zloss": ("z_loss_coef", DEFAULT_Z_LOSS_COEF),
    "device": ("device_loss_coef", DEFAULT_DEVICE_LOSS_COEF),
    "loss_free": ("bias_update_rate", DEFAULT_BIAS_UPDATE_RATE),
}


@lru_cache(maxsize=1)
def _stdlib_sources() -> tuple[Path, ...]:
    """The standard library's ``.py`` files in sorted path order, installed packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(
        path
        for path in sorted(root.rglob("*.py"))
        if not {"site-packages", "dist-packages"} & set(path.relative_to(root).parts)
        and path.is_file()
    )


@lru_cache(maxsize=4)
def _corpus_bytes(n_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for path in _stdlib_sources():
        data = path.read_bytes()
        chunks.append(data[: n_bytes - total])
        total += len(chunks[-1])
        if total >= n_bytes:
            break
    return b"".join(chunks)


def load_corpus(n_bytes: int = DEFAULT_CORPUS_BYTES) -> torch.Tensor:
    """(n,) uint8, n <= n_bytes: the standard library's ``.py`` files, in sorted path order."""
    if n_bytes < 2:
        raise InputError("must be at least 2", field="corpus_bytes", value=n_bytes)
    data = _corpus_bytes(n_bytes)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def balance_config(config: MoEConfig, balance: str) -> MoEConfig:
    """``config`` with only the balancing terms named in ``balance`` switched on.

    ``balance`` is ``none`` or ``+``-joined terms of :data:`BALANCE_TERMS` (``aux``,
    ``zloss``, ``device``, ``loss_free``), e.g. ``loss_free+zloss``. An enabled term keeps
    the config's coefficient when it is non-zero, else takes the published default;
    disabled terms are set to zero. ``loss_free`` needs the ``sigmoid_bias`` router,
    ``device`` at least 2 ``n_devices``.
    """
    terms = [] if balance == "none" else balance.split("+")
    unknown = [t for t in terms if t not in BALANCE_TERMS]
    if unknown or not balance or len(set(terms)) != len(terms):
        raise InputError(
            f"must be none or '+'-joined terms of {', '.join(BALANCE_TERMS)}",
            field="balance",
            value=balance,
        )
    if "loss_free" in terms and config.router != "sigmoid_bias":
        raise InputError(
            "balance loss_free needs router sigmoid_bias", field="router", value=config.router
        )
    if "device" in terms and config.n_devices < 2:
        raise InputError(
            "balance device needs experts split over 2 or more devices",
            field="n_devices",
            value=config.n_devices,
        )
    changes: dict[str, Any] = {}
    for term, (name, default) in BALANCE_TERMS.items():
        current = getattr(config, name)
        changes[name] = (current or default) if term in terms else 0.0
    return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class StepStats:
    """Figures of one training step."""

    step: int
    lm_loss: float
    loss: float
    balance_ratio: float
    mean_sq_logit: float
    router_z: float


@dataclass
class TrainResult:
    """Per-step figures of a training run, and where its checkpoint went.

    ``lm_loss``: cross-entropy (nats/byte); ``loss``: the objective (lm + balancing
    terms); ``balance_ratio``: max / mean of the assignments per expert, averaged over MoE
    layers; ``mean_sq_logit``: mean squared router logit, averaged over MoE layers;
    ``router_z``: mean of ``logsumexp(logits)^2`` (the z-loss value), averaged likewise.
    """

    config: MoEConfig
    balance: str
    seed: int
    steps: int
    batch_size: int
    seq_len: int
    lm_loss: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    balance_ratio: list[float] = field(default_factory=list)
    mean_sq_logit: list[float] = field(default_factory=list)
    router_z: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    corpus_sha256: str = ""
    checkpoint: Path | None = None
    model: MoELM | None = field(default=None, repr=False)  # the trained model

    @staticmethod
    def _tail(values: list[float]) -> float:
        n = max(1, len(values) // 10)
        return float(sum(values[-n:]) / n) if values else math.nan

    def summary(self) -> dict[str, Any]:
        """Final figures, each the mean over the last 10 % of steps (at least one)."""
        tokens = self.steps * self.batch_size * self.seq_len
        return {
            "balance": self.balance,
            "router": self.config.router,
            "seed": self.seed,
            "steps": self.steps,
            "final_lm_loss": self._tail(self.lm_loss),
            "final_balance_ratio": self._tail(self.balance_ratio),
            "final_mean_sq_logit": self._tail(self.mean_sq_logit),
            "final_router_z": self._tail(self.router_z),
            "wall_time_s": self.wall_time_s,
            "tokens_per_s": tokens / self.wall_time_s if self.wall_time_s > 0 else math.nan,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic torch algorithms inside the block; the previous setting after it."""
    was, warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to lr / 10."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_reference(
    config: MoEConfig,
    *,
    steps: int = 500,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    balance: str = "none",
    out: Path | None = None,
    corpus_bytes: int = DEFAULT_CORPUS_BYTES,
    on_step: Callable[[StepStats], None] | None = None,
) -> TrainResult:
    """Train a fresh :class:`MoELM` on random windows of :func:`load_corpus` with AdamW.

    Deterministic for a seed (on the same machine and thread count): weights, batches
    and router noise come from ``seed``; the caller's global RNG state is restored.
    ``balance`` picks the balancing terms (:func:`balance_config`). With ``out``, writes a
    checkpoint (config + state_dict) atomically. ``on_step`` is called after every step.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise InputError("must be a positive integer", field=name, value=value)
    if not lr > 0:
        raise InputError("must be > 0", field="lr", value=lr)
    cfg = balance_config(config, balance)
    if seq_len > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
    data = load_corpus(corpus_bytes)
    if data.numel() <= seq_len + 1:
        raise InputError(f"corpus has only {data.numel()} bytes", field="seq_len", value=seq_len)
    result = TrainResult(cfg, balance, seed, steps, batch_size, seq_len)
    result.corpus_sha256 = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _deterministic():
        torch.manual_seed(seed)
        model = MoELM(cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len + 1)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            start = torch.randint(0, data.numel() - seq_len - 1, (batch_size, 1), generator=gen)
            window = data[start + offsets].long()  # (B, T+1)
            output: MoEOutput = model(window[:, :-1], window[:, 1:])
            opt.zero_grad(set_to_none=True)
            output.losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if cfg.bias_update_rate > 0:
                model.update_expert_bias(output.routing)
            records = output.routing
            stats = StepStats(
                step=step,
                lm_loss=output.losses["lm"].item(),
                loss=output.losses["loss"].item(),
                balance_ratio=sum(r.balance_ratio() for r in records) / max(1, len(records)),
                mean_sq_logit=sum(float(r.router_logits.square().mean()) for r in records)
                / max(1, len(records)),
                router_z=output.losses["z"].item(),
            )
            result.lm_loss.append(stats.lm_loss)
            result.loss.append(stats.loss)
            result.balance_ratio.append(stats.balance_ratio)
            result.mean_sq_logit.append(stats.mean_sq_logit)
            result.router_z.append(stats.router_z)
            if on_step is not None:
                on_step(stats)
    result.wall_time_s = time.perf_counter() - t0
    result.model = model
    if out is not None:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(cfg),
            "state_dict": model.state_dict(),
            "balance": balance,
            "seed": seed,
            "steps": steps,
            "corpus_sha256": result.corpus_sha256,
        }
        result.checkpoint = atomic_write(out, lambda p: torch.save(checkpoint, p))
    return result


def load_reference(path: Path) -> tuple[MoELM, dict[str, Any]]:
    """Read a checkpoint of :func:`train_reference`: the model (eval mode) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such checkpoint file", file=path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise InputError(f"not a torch checkpoint ({type(err).__name__})", file=path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"not a {CHECKPOINT_FORMAT} checkpoint", file=path, field="format")
    model = MoELM(MoEConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
