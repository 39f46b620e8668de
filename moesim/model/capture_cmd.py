"""``moesim capture``: route a text through an MoE model and write the routing as a trace.

Sources:

* ``reference:CHECKPOINT.pt``: moesim's reference MoE (:mod:`moesim.model.reference`),
  a checkpoint written by ``moesim train-reference`` (:func:`moesim.model.train.train_reference`).
* ``hf-config:FAMILY``: a tiny, randomly initialised transformers model of that family
  (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``deepseek_v2``,
  ``deepseek_v3``), for demonstration: its routing reflects random weights.
* ``hf:DIR``: a transformers model saved in a local folder (``save_pretrained``); no
  download is ever attempted. Its tokenizer is used when the folder holds one.

The text is ``--text-file`` or, by default, the source of a few modules of Python's
standard library. Without a tokenizer, token ids are the text's UTF-8 bytes modulo
the model's vocabulary size.

Registered in :mod:`moesim.cli` as ``app.command("capture")(capture_cmd)``.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from moesim.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from moesim.traces.store import RoutingTrace

__all__ = [
    "DEFAULT_SEQ_LEN",
    "STDLIB_CORPUS",
    "capture_cmd",
    "capture_source",
    "stdlib_text",
    "tiny_hf_model",
]

STDLIB_CORPUS = ("textwrap", "difflib", "argparse", "json.decoder", "string")
"""Standard-library modules whose source is the default corpus."""

DEFAULT_SEQ_LEN = 2048
"""Longest sequence the command builds unless ``--seq-len`` says otherwise."""

_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def stdlib_text(modules: tuple[str, ...] = STDLIB_CORPUS) -> str:
    """The source text of ``modules`` (standard library), concatenated in order."""
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            parts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return "\n".join(parts)


def tiny_hf_model(family: str, *, seed: int = 0, max_positions: int = 4096) -> nn.Module:
    """A small randomly initialised transformers MoE of ``family`` (8 experts, top-2).

    4 decoder layers of width 64 and a 256-token vocabulary (one id per byte); the
    DeepSeek models keep layer 0 dense and route group-limited (4 groups, best 2).
    """
    try:
        import torch
        import transformers as tf
    except ImportError:
        raise InputError(
            "hf-config needs transformers: pip install 'moesim[hf]'", field="source"
        ) from None
    common: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        experts_implementation="eager",  # transformers 5's CPU grouped_mm is slow at this size
    )
    deepseek: dict[str, Any] = dict(
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=32,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
    )
    qwen: dict[str, Any] = dict(num_experts=8, moe_intermediate_size=32)
    builders: dict[str, tuple[Any, Any, dict[str, Any]]] = {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=8)),
        "qwen2_moe": (
            tf.Qwen2MoeConfig,
            tf.Qwen2MoeForCausalLM,
            qwen | dict(shared_expert_intermediate_size=64),
        ),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, qwen | dict(head_dim=16)),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=8)),
        "deepseek_v2": (
            tf.DeepseekV2Config,
            tf.DeepseekV2ForCausalLM,
            deepseek | dict(topk_method="group_limited_greedy", routed_scaling_factor=1.0),
        ),
        "deepseek_v3": (
            tf.DeepseekV3Config,
            tf.DeepseekV3ForCausalLM,
            deepseek | dict(norm_topk_prob=True, routed_scaling_factor=2.5),
        ),
    }
    if family not in builders:
        raise InputError(
            f"unknown model family; one of {', '.join(_FAMILIES)}", field="source", value=family
        )
    config_cls, model_cls, extra = builders[family]
    torch.manual_seed(seed)
    model: nn.Module = model_cls(config_cls(**(common | extra)))
    return model.eval()


def _load_reference(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The reference MoE and its checkpoint metadata, via ``moesim.model.train.load_reference``."""
    try:
        from moesim.model.train import load_reference
    except ImportError:
        raise InputError("reference model not available", file=path, field="source") from None
    model, meta = load_reference(path)
    return model, meta


def _byte_ids(text: str, vocab_size: int) -> np.ndarray:
    import numpy as np

    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) % vocab_size


def capture_source(
    source: str,
    out: str | Path,
    *,
    text_file: str | Path | None = None,
    tokens: int = 2048,
    seq_len: int = 0,
    seed: int = 0,
    force: bool = False,
) -> RoutingTrace:
    """Route ``tokens`` tokens of a text through the model ``source`` names
    (``reference:CHECKPOINT.pt``, ``hf-config:FAMILY`` or ``hf:DIR``) and write the routing
    to the trace folder ``out``, as ``moesim capture`` does; returns the trace.

    The text is ``text_file`` or, by default, the source of a few standard-library modules
    (:data:`STDLIB_CORPUS`); sequences are ``seq_len`` tokens (0: the least of ``tokens``,
    :data:`DEFAULT_SEQ_LEN` and the model's limit); ``seed`` seeds an hf-config model's
    random weights. Bad input raises :class:`~moesim.errors.InputError`.
    """
    from moesim.fileio import check_output_folder

    out = Path(out)
    text_file = Path(text_file) if text_file is not None else None
    kind, sep, target = source.partition(":")
    if not sep or not target or kind not in ("reference", "hf-config", "hf"):
        raise InputError(
            "source must be reference:CHECKPOINT.pt, hf-config:FAMILY or hf:DIR",
            field="source",
            value=source,
        )
    if tokens < 1:
        raise InputError("must be at least 1", field="tokens", value=tokens)
    if seq_len < 0:
        raise InputError("must be 0 (automatic) or positive", field="seq-len", value=seq_len)
    check_output_folder(out, "trace", force=force)  # before loading or running the model
    from moesim.console import status
    from moesim.model.capture import capture_hf, capture_reference

    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read text ({exc})", file=text_file) from None
        corpus = str(text_file)
    else:
        text = stdlib_text()
        corpus = "python-stdlib:" + ",".join(STDLIB_CORPUS)

    model: nn.Module
    tokenizer: Any = None
    checkpoint: dict[str, Any] | None = None
    if kind == "reference":
        model, ckpt_meta = _load_reference(Path(target))
        checkpoint = {k: v for k, v in ckpt_meta.items() if k != "config"}
        cfg: Any = getattr(model, "cfg", None)
        vocab, max_len, name = int(cfg.vocab_size), int(cfg.max_seq_len), Path(target).stem
    else:
        if kind == "hf-config":
            model = tiny_hf_model(target, seed=seed, max_positions=max(4096, seq_len))
        else:
            model, tokenizer = _load_hf_dir(Path(target))
        config: Any = getattr(model, "config", None)
        vocab = int(config.vocab_size)
        max_len = int(getattr(config, "max_position_embeddings", 0) or tokens)
        if kind == "hf-config":
            name = f"tiny-{target}"
        else:
            name = str(getattr(config, "_name_or_path", "") or Path(target).name)

    if tokenizer is not None:
        import numpy as np

        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        tokenization = "hf-tokenizer"
    else:
        ids = _byte_ids(text, vocab)
        tokenization = f"utf8-bytes-mod-{vocab}"
    if ids.size < tokens:
        raise InputError(
            f"the text holds only {ids.size} tokens", file=text_file, field="tokens", value=tokens
        )
    seq = seq_len or min(tokens, max_len, DEFAULT_SEQ_LEN)
    if seq > max_len:
        raise InputError(f"longer than the model allows ({max_len})", field="seq-len", value=seq)
    if tokens % seq:
        raise InputError(
            f"tokens must be a multiple of the sequence length ({seq}; set --seq-len)",
            field="tokens",
            value=tokens,
        )
    batch = ids[:tokens].reshape(tokens // seq, seq)  # (B, T)
    meta: dict[str, Any] = {
        "model": name,
        "source_spec": source,
        "corpus": corpus,
        "tokenization": tokenization,
        "seed": seed if kind == "hf-config" else None,
    }
    if checkpoint is not None:
        meta["checkpoint"] = checkpoint
    capture = capture_reference if kind == "reference" else capture_hf
    with status(f"capturing {name}'s routing"):
        return capture(model, batch, out, meta=meta, force=force)


def capture_cmd(
    source: Annotated[
        str,
        typer.Argument(
            help="reference:CHECKPOINT.pt | hf-config:FAMILY (tiny random model) | hf:DIR",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Trace folder to write.", show_default=False)],
    text_file: Annotated[
        Path | None,
        typer.Option(
            "--text-file", help="UTF-8 text to route (default: Python standard-library source)."
        ),
    ] = None,
    tokens: Annotated[int, typer.Option(help="Tokens to route.")] = 2048,
    seq_len: Annotated[
        int,
        typer.Option(
            "--seq-len",
            help=f"Tokens per sequence; 0 = min(tokens, {DEFAULT_SEQ_LEN}, the model's limit).",
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the hf-config model's random weights.")] = 0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the trace (folder, layers, tokens, experts, top-k, model, source, "
            "capture settings) and the wall time as JSON.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Write into an existing folder that is not a trace (its files kept)."
        ),
    ] = False,
) -> None:
    """Capture an MoE model's routing of a text into a trace (one step, every MoE layer)."""
    t0 = time.perf_counter()
    trace = capture_source(
        source, out, text_file=text_file, tokens=tokens, seq_len=seq_len, seed=seed, force=force
    )
    if as_json:
        from moesim.console import print_json
        from moesim.traces.commands import trace_json

        wall_s = round(time.perf_counter() - t0, 3)
        print_json(trace_json(out, trace) | {"wall_time_s": wall_s})
        return
    typer.echo(
        f"captured {trace.num_tokens:,} tokens x {len(trace.layers)} MoE layers "
        f"({trace.num_experts} experts, top-{trace.top_k}) of {trace.meta['model']} -> {out} "
        f"in {time.perf_counter() - t0:.1f} s"
    )


def _load_hf_dir(path: Path) -> tuple[nn.Module, Any]:
    """A transformers causal LM and (if present) its tokenizer from a local folder."""
    if not (path / "config.json").is_file():
        raise InputError("not a saved transformers model (no config.json)", file=path)
    try:
        import transformers as tf
    except ImportError:
        raise InputError(
            "hf needs transformers: pip install 'moesim[hf]'", field="source"
        ) from None
    model: nn.Module = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
