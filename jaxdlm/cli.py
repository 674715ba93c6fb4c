"""The ``jaxdlm`` command line.

``jaxdlm demo``       runs every decoding mode of the embedded default model (``jaxdlm.load_default()``).
``jaxdlm info``       prints the devices, versions and, with ``--config``, a model config, checkpoint or run folder.
``jaxdlm generate``   generates text from a checkpoint or training run folder (its tokenizer and chat template, or
                      ``--tokenizer``) in any mode.
``jaxdlm train``      trains / fine-tunes from a TOML or JSON experiment config (``jaxdlm.training``).

Every argument is checked before any work: a bad value ends the command with one line on stderr that
names the allowed values, and exit code 2; so does any other error (``--debug`` shows the traceback).
``jaxdlm generate`` checks what it can against the model's config and tokenizer before loading the weights.
Paths may be relative or start with ``~``.

JAX's persistent compilation cache is on: compiled programs are kept in ``$JAXDLM_CACHE_DIR`` (default
``~/.cache/jaxdlm/xla``), so a second run with the same shapes reads its program instead of compiling it
again; ``--no-compile-cache`` turns it off.  JAX never caches a program with a host callback, which is
what the progress line of ``jaxdlm generate`` on a terminal uses (``--no-progress`` drops it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

CACHE_DIR_ENV = "JAXDLM_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/jaxdlm/xla"
DTYPES = ("float32", "bfloat16")
QUANTIZE = ("int8", "int4", "fp8")  # jaxdlm.quant.SCHEMES
# The demo's quadratic_spec block: N = 16 runs an N(N+1) = 272-token forward instead of 1056 tokens at the
# model's block 32, for about the same tokens per forward (measured: docs/default_model.md)
DEMO_QUADRATIC_BLOCK = 16
PROMPT_MARK = "\u2502"  # between prompt and continuation when the output is not a terminal


# ------------------------------------------------------------------------------------- argument types


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of this command
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {allowed}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range; expected {allowed}")
        return value

    return parse


def _float_in(lo: float, hi: float | None = None, *, lo_open: bool = False, none_word: str | None = None):
    """An argparse type: a number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ``none_word`` parses to None."""
    allowed = (f"a number {'>' if lo_open else '>='} {lo:g}" if hi is None
               else f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    if none_word:
        allowed += f" or {none_word!r}"

    def parse(text: str) -> float | None:
        if none_word and text.strip().lower() == none_word:
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected {allowed}") from None
        if not math.isfinite(value) or not (value > lo if lo_open else value >= lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; expected {allowed}")
        return value

    return parse


# ------------------------------------------------------------------------------------- shared helpers


def _versions() -> dict:
    import flax
    import jax

    return {"jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def compile_cache_dir(args) -> str | None:
    """The persistent compilation cache folder of this command: ``None`` with ``--no-compile-cache``,
    else ``$JAXDLM_CACHE_DIR`` or ``~/.cache/jaxdlm/xla``."""
    if getattr(args, "no_compile_cache", False):
        return None
    return os.path.expanduser(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def _configure_compile_cache(args) -> str | None:
    """Points JAX's persistent compilation cache at :func:`compile_cache_dir` (before anything compiles)."""
    path = compile_cache_dir(args)
    if path is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
    return path


# JAX's monitoring events for the stages of a jit compilation: tracing, lowering, and the XLA compile
# (which includes a persistent-cache read on a hit).
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_clock = {"seconds": 0.0, "listening": False}


def _on_duration_event(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_clock["seconds"] += duration


def _compile_seconds() -> float | None:
    """Seconds this process has spent compiling JAX programs so far (``None``: no monitoring API)."""
    if not _compile_clock["listening"]:
        import jax

        try:
            jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
        except AttributeError:  # pragma: no cover - a jax without the listener API
            return None
        _compile_clock["listening"] = True
    return _compile_clock["seconds"]


def _timed(fn, *args, **kwargs):
    """``(result, compile_seconds or None, run_seconds)`` of one call; compile = JAX tracing, lowering and
    XLA compilation (or the persistent-cache read), run = the rest of the wall time."""
    before = _compile_seconds()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    total = time.perf_counter() - t0
    after = _compile_seconds()
    compile_s = None if before is None or after is None else min(after - before, total)
    return result, compile_s, total - (compile_s or 0.0)


def _timing_text(tokens: int, compile_s: float | None, run_s: float) -> str:
    head = "compile ?" if compile_s is None else f"compile {compile_s:.1f}s"
    return f"{head}, run {run_s:.2f}s ({tokens / max(run_s, 1e-9):.1f} tokens/s)"


def _is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _prompt_and_continuation(prompt: str, continuation: str, stream) -> str:
    """The prompt dimmed (terminal) or followed by a ``│`` mark (otherwise), then the continuation."""
    if _is_terminal(stream) and not os.environ.get("NO_COLOR"):
        return f"\033[2m{prompt}\033[22m{continuation}"
    return prompt + PROMPT_MARK + continuation


class _Progress:
    """``generate``'s ``stream_callback``: a one-line count of committed tokens on a terminal."""

    def __init__(self, stream, total: int, every: float = 0.2):
        self.stream, self.total, self.every = stream, total, every
        self.done, self.last = 0, 0.0

    def __call__(self, tokens, counts) -> None:
        import numpy as np

        self.done += int(np.sum(counts))
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self.stream.write(f"\r  generating: {self.done}/{self.total} tokens")
            self.stream.flush()

    def close(self) -> None:
        import jax

        jax.effects_barrier()  # every callback has run
        if self.last:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _stop_reason(tokens, length: int, eos_ids, max_new: int) -> str:
    """Why a row ended: at an EOS id or at ``--max-new-tokens``."""
    if length and int(tokens[length - 1]) in eos_ids:
        return f"stopped at EOS (id {int(tokens[length - 1])}) after {length} tokens"
    return f"{length} tokens, stopped at --max-new-tokens={max_new}"


# ------------------------------------------------------------------------------------- commands


def cmd_demo(args) -> int:
    """Every decoding mode on the embedded default model (held-out prompts), with nfe / TPF / agreement."""
    import numpy as np

    from jaxdlm.default import card, heldout_prompts, load_default
    from jaxdlm.generation import generate

    every = heldout_prompts()
    if args.prompt_index + args.num_prompts > len(every):
        raise ValueError(f"--prompt-index={args.prompt_index} --num-prompts={args.num_prompts} run past the "
                         f"{len(every)} held-out prompts: the index must lie in [0, {len(every) - 1}] and "
                         f"index + count be at most {len(every)}")
    t0 = time.perf_counter()
    model = load_default()
    info = card()
    rec = info["recommended"]
    print(f"jaxdlm demo: the embedded default model ({info['name']}; {model.config.num_params() / 1e6:.1f}M params, "
          f"loaded in {time.perf_counter() - t0:.1f}s)")
    texts = every[args.prompt_index:args.prompt_index + args.num_prompts]
    tok = model.tokenizer
    prompts = [tok(t)["input_ids"] for t in texts]
    common = dict(max_new_tokens=args.max_new_tokens, block_length=rec["block_length"], eos_token_id=(),
                  temperature=0.0, seed=args.seed)
    print(f"prompt (held-out stdlib code, {len(prompts[0])} bytes):\n{texts[0]}\n" + "-" * 72)
    print("(compile: JAX tracing and XLA compilation, read from the compile cache on later runs; run: the rest)")
    ar_tokens = None
    for mode, kw in (("ar", {}), ("diffusion", {"threshold": rec["threshold"]}), ("linear_spec", {}),
                     ("quadratic_spec", {"block_length": DEMO_QUADRATIC_BLOCK})):
        res, compile_s, run_s = _timed(generate, model, prompts, mode=mode, **dict(common, **kw))
        toks = np.asarray(res.tokens)
        n, nfe = int(res.lengths.sum()), int(res.nfe.sum())
        if ar_tokens is None:
            ar_tokens = toks
        same = "identical to AR" if np.array_equal(toks, ar_tokens) else \
            f"{np.mean(toks == ar_tokens):.0%} of positions equal to AR"
        label = mode + (f" (threshold {kw['threshold']})" if "threshold" in kw else "") + \
            (f" (block {kw['block_length']})" if "block_length" in kw else "")
        print(f"[{label}] {n} tokens, nfe {nfe}, TPF {n / max(nfe, 1):.2f}, {_timing_text(n, compile_s, run_s)}, "
              f"{same}")
        print(_prompt_and_continuation(texts[0], tok.decode(toks[0].tolist()), sys.stdout))
        print("-" * 72)
    print(f"quadratic_spec runs at block {DEMO_QUADRATIC_BLOCK} here: a B(B+1)-token forward at the model's block "
          f"{rec['block_length']} costs about 5x more on a CPU for about the same TPF")
    print(f"  {_versions()}")
    return 0


def _check_prompt_text(text: str, index: int, count: int) -> None:
    """``ValueError`` naming the first byte that is not UTF-8 (Python keeps undecodable bytes of the command line
    as lone surrogates ``U+DC80..U+DCFF``), or another lone surrogate, in ``--prompt`` number ``index``."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            which = "--prompt" if count == 1 else f"--prompt number {index + 1}"
            what = (f"byte 0x{ord(ch) - 0xDC00:02x}, which is not UTF-8" if "\udc80" <= ch <= "\udcff"
                    else f"the lone surrogate U+{ord(ch):04X}")
            raise ValueError(f"{which} is not valid UTF-8 text: character {i} is {what} (before it: "
                             f"{text[:i][-20:]!r}); pass the prompt as UTF-8 (e.g. convert the file with iconv -t "
                             "UTF-8)")


def _encode_prompt(tokenizer, text: str, chat: bool) -> list:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat wraps the prompt in the tokenizer's chat template, and this checkpoint's "
                             "tokenizer has none: drop --chat")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_generate_args(args) -> None:
    """The checks of ``jaxdlm generate`` that need no model: those involving two arguments (each one alone is
    checked by argparse) and the prompts' text.  They run before anything is read from the checkpoint."""
    if args.quantize is not None and args.dtype == "float32":
        raise ValueError(f"--quantize {args.quantize} dequantizes its weights into bfloat16 activations, and --dtype "
                         "float32 asks for full precision: drop --dtype float32 (or --quantize)")
    if args.quantize_head and args.quantize is None:
        raise ValueError("--quantize-head needs --quantize int8, int4 or fp8")
    for i, text in enumerate(args.prompt):
        _check_prompt_text(text, i, len(args.prompt))


def decode_options(args):
    """The :class:`~jaxdlm.generation.options.DecodeOptions` of ``jaxdlm generate``'s flags (one flag per field)."""
    from jaxdlm.generation.options import DecodeOptions

    return DecodeOptions(threshold=args.threshold, steps_per_block=args.steps_per_block, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, spec_sampling=args.spec_sampling,
                         eos_token_id=tuple(args.eos_token_id) if args.eos_token_id else None,
                         max_thinking_tokens=args.max_thinking_tokens, end_think_token_id=args.end_think_token_id,
                         policy=args.policy, margin=args.margin, entropy_bound=args.entropy_bound)


def _check_against_config(args, config) -> list[str]:
    """The library's own checks of the decoding options, the mode and the block length against the model's config
    (read without the weights; the messages name the keyword of each flag: ``--entropy-bound`` is
    ``entropy_bound``).  Returns the notes to print about ``--block-length``."""
    from jaxdlm.generation.api import resolve_mode

    block = _block_length(args, config)
    mode = resolve_mode(config, args.mode, len(args.prompt), args.max_new_tokens, block)
    decode_options(args).check(config).check_mode(mode, block)
    if args.block_length is None or args.block_length == config.block_size:
        return []
    if not mode.uses_block:
        return [f"--block-length {args.block_length} has no role in --mode {mode.name} (one token per forward); "
                "ignored"]
    return [f"--block-length {args.block_length} differs from the model's training block (config.block_size = "
            f"{config.block_size})"]


def _block_length(args, config) -> int:
    """``--block-length``, or the model's training block (``config.block_size``) when not given."""
    return config.block_size if args.block_length is None else args.block_length


def _encode_prompts(tokenizer, args) -> list[list]:
    """``args.prompt`` as token ids (``--chat``: in the tokenizer's chat template)."""
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer (tokenizer.json / tokenizer_config.json): "
                         "jaxdlm generate needs one to encode --prompt: pass --tokenizer PATH")
    return [_encode_prompt(tokenizer, p, args.chat) for p in args.prompt]


def run_generate(model, tokenizer, args, out=None, err=None) -> dict:
    """Encodes ``args.prompt`` (list of texts), generates, prints each prompt (dimmed on a terminal, else
    followed by ``│``) with its continuation and why it stopped, then nfe / TPF / compile and run time.

    Separate from :func:`cmd_generate` so that it runs on any model + tokenizer (tests build both).
    ``err`` receives the progress line (a terminal only, unless ``args.progress`` says otherwise).
    Returns the figures printed (per row text, tokens, nfe, TPF, stop reason; tokens/s, times).
    """
    from jaxdlm.generation import generate

    out = out or sys.stdout
    err = err or sys.stderr
    _check_generate_args(args)
    for note in _check_against_config(args, model.config):
        print(f"jaxdlm generate: note: {note}", file=err)
    prompts = _encode_prompts(tokenizer, args)
    options = decode_options(args)
    eos_ids = options.eos_ids(model.config)
    kw = dict(mode=args.mode, max_new_tokens=args.max_new_tokens, block_length=_block_length(args, model.config),
              options=options)
    progress = None
    if args.progress if args.progress is not None else _is_terminal(err):
        progress = _Progress(err, len(prompts) * args.max_new_tokens)
    if args.warmup:  # the same callback object: a new one would be another program
        generate(model, prompts, **kw, stream_callback=progress)
        if progress is not None:
            progress.close()
            progress.done = progress.last = 0
    try:
        res, compile_s, run_s = _timed(generate, model, prompts, **kw, stream_callback=progress)
    finally:
        if progress is not None:
            progress.close()
    rows = []
    for i, seq in enumerate(res.sequences()):
        text = tokenizer.decode(seq.tolist(), skip_special_tokens=False)
        stop = _stop_reason(seq, int(res.lengths[i]), eos_ids, args.max_new_tokens)
        if text and not text.strip():
            stop += f"; the continuation is only whitespace ({len(text)} characters)"
        rows.append(dict(text=text, tokens=int(res.lengths[i]), nfe=int(res.nfe[i]), stop=stop,
                         tpf=float(res.lengths[i] / max(int(res.nfe[i]), 1))))
        if len(prompts) > 1:
            print(f"--- [{i}]", file=out)
        prompt_text = tokenizer.decode(prompts[i], skip_special_tokens=False)
        print(_prompt_and_continuation(prompt_text, text, out), file=out)
        print(f"[{stop}]", file=out)
    total = int(res.lengths.sum())
    tps = total / max(run_s, 1e-9)
    print(f"[mode={res.mode} tokens={total} nfe={int(res.nfe.sum())} TPF={total / max(int(res.nfe.sum()), 1):.2f} | "
          f"{_timing_text(total, compile_s, run_s)}]", file=out)
    return dict(rows=rows, mode=res.mode, compile_seconds=compile_s, run_seconds=run_s, tokens_per_second=tps)


def default_model_note() -> str:
    """What ``jaxdlm generate`` says (once, on stderr) when it runs the embedded default model."""
    from jaxdlm.default import card

    info = card()
    return (f"no --checkpoint: using the embedded default model, a {info['params'] / 1e6:.1f}M-parameter byte-level "
            "Python code model trained on CPython's standard library. It continues Python source (jaxdlm demo "
            "shows held-out code it does well on); it is no chat or general-text model: pass --checkpoint for one")


def _tokenizer(args, path):
    """``--tokenizer`` (a folder of tokenizer files or a tokenizer.json), else the checkpoint's (None: none)."""
    from jaxdlm.checkpoint import is_run_folder, load_tokenizer, resolve_path

    if args.tokenizer is None:
        tok = load_tokenizer(path)
        if tok is None and is_run_folder(path):
            raise ValueError(f"{path} is a training run folder without tokenizer files: pass --tokenizer PATH (the "
                             "tokenizer folder or tokenizer.json the run's data was made with)")
        return tok
    tok_path = resolve_path(args.tokenizer)
    if tok_path.is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(tok_path))
    tok = load_tokenizer(tok_path) if tok_path.is_dir() else None
    if tok is None:
        raise ValueError(f"--tokenizer {tok_path} is neither a tokenizer.json file nor a folder with tokenizer files "
                         "(tokenizer.json, tokenizer_config.json or tokenizer.model)")
    return tok


def cmd_generate(args, err=None) -> int:
    """Everything that needs no weights is checked first: the arguments, the config (``jaxdlm.json`` or a run
    folder's ``model_config.json``), the tokenizer and the prompts; then the weights load and generate runs."""
    from jaxdlm.checkpoint import load, read_config, resolve_path

    err = err or sys.stderr
    _check_generate_args(args)
    if args.checkpoint is None:
        from jaxdlm.default import default_model_path

        path = default_model_path()
        print(f"jaxdlm generate: {default_model_note()}", file=err)
    else:
        path = resolve_path(args.checkpoint)
    _check_against_config(args, read_config(path))
    tokenizer = _tokenizer(args, path)
    _encode_prompts(tokenizer, args)  # --chat needs a chat template
    quantize = None
    if args.quantize is not None:
        from jaxdlm.quant import Quantization

        quantize = Quantization(args.quantize, args.quantize_head)
    model = load(path, dtype=args.dtype, quantize=quantize, tokenizer=False)
    model.tokenizer = tokenizer
    run_generate(model, tokenizer, args, err=err)
    return 0


def checkpoint_info(path) -> dict:
    """What ``jaxdlm info --config`` prints for a jaxdlm checkpoint folder (no weights are read)."""
    from jaxdlm.checkpoint import load_tokenizer, read_metadata, resolve_path
    from jaxdlm.config import ModelConfig

    meta = read_metadata(path)
    cfg = ModelConfig.from_dict(meta["config"])
    lora = None
    if meta.get("has_lora"):
        layers, _, rank = meta["lora"]["a"]["shape"]
        lora = {"rank": rank, "layers": layers, "target": "o_proj, draft passes of linear_spec only"}
    tok = load_tokenizer(path)
    tokenizer = None if tok is None else {
        "class": type(tok).__name__, "vocab_size": len(tok), "chat_template": bool(getattr(tok, "chat_template", None)),
        "special_tokens": {k: v for k, v in getattr(tok, "special_tokens_map", {}).items() if isinstance(v, str)}}
    return {"checkpoint": os.fspath(resolve_path(path)), "dtype": meta["dtype"], "num_params": cfg.num_params(),
            "quantization": meta.get("quantization"), "lora": lora, "tokenizer": tokenizer,
            "source": meta.get("source"), "config": cfg.to_dict()}


def run_info(path) -> dict:
    """What ``jaxdlm info --config`` prints for a training run folder (no weights are read): its steps, the latest
    one's kind (full, draft LoRA or adapter, with the base) and the model config."""
    from jaxdlm.checkpoint import read_config
    from jaxdlm.training.checkpointing import Checkpointer

    cfg = read_config(path)
    ck = Checkpointer(os.path.join(path, "checkpoints"))
    try:
        steps = ck.all_steps()
        meta = ck.restore_meta() if steps else {}
    finally:
        ck.close()
    lora = ({"rank": meta.get("lora_rank"), "base_run": meta.get("base_run"), "base_step": meta.get("base_step")}
            if meta.get("kind") == "lora" else None)
    adapter = dict(meta["adapter"], base=meta.get("base")) if meta.get("kind") == "adapter" else None
    return {"run": os.fspath(path), "steps": steps, "latest_step": steps[-1] if steps else None,
            "kind": meta.get("kind"), "lora": lora, "adapter": adapter, "num_params": cfg.num_params(),
            "config": cfg.to_dict()}


def cmd_info(args) -> int:
    info = _versions()
    if args.config is not None:
        from jaxdlm.checkpoint import METADATA_FILE, is_run_folder, resolve_path
        from jaxdlm.config import ModelConfig

        path = resolve_path(args.config)
        if args.config == "default" and not path.exists():
            from jaxdlm.default import default_model_path

            path = default_model_path()
        if is_run_folder(path):
            info.update(run_info(path))
        elif os.path.isfile(os.path.join(path, METADATA_FILE)):
            info.update(checkpoint_info(path))
        else:
            if not os.path.exists(path):
                raise ValueError(f"--config {path} does not exist; pass a Hugging Face config.json (file or folder), "
                                 f"a jaxdlm checkpoint folder, or 'default' (the embedded default model)")
            cfg = ModelConfig.from_hf(path)
            info["config"] = cfg.to_dict()
            info["num_params"] = cfg.num_params()
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_serve(args) -> int:
    """Loads the checkpoint (default: the embedded default model), compiles the engine's programs, then serves the
    OpenAI-compatible API until SIGTERM / Ctrl-C (running requests finish first)."""
    from jaxdlm.checkpoint import load, resolve_path
    from jaxdlm.serving import Engine
    from jaxdlm.serving.server import serve

    if args.checkpoint is None:
        from jaxdlm.default import default_model_path

        path = default_model_path()
        print(f"jaxdlm serve: {default_model_note()}", file=sys.stderr)
    else:
        path = resolve_path(args.checkpoint)
    tokenizer = _tokenizer(args, path)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files: pass --tokenizer PATH (the server takes text)")
    template = None
    if args.chat_template is not None:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    model = load(path, dtype=args.dtype, tokenizer=False)
    mode = args.mode or ("linear_spec" if model.config.mask_token_id is not None else "ar")
    engine = Engine(model, mode=mode, slots=args.slots, max_len=args.max_len, max_new=args.max_tokens,
                    block_length=args.block_length, spec_sampling=args.spec_sampling, logprobs=args.logprobs)
    print(f"jaxdlm serve: {mode}, {args.slots} slots of {engine.max_len} cache slots; compiling, then serving on "
          f"http://{args.host}:{args.port}", file=sys.stderr)
    return serve(engine, tokenizer, host=args.host, port=args.port, model_name=args.model_name,
                 max_queue=args.max_queue, chat_template=template, log_level=args.log_level,
                 cycles=args.cycles_per_step)


def add_serve_parser(sub, parents=()):
    """The ``serve`` subcommand: an OpenAI-compatible HTTP server (docs/serving.md)."""
    from jaxdlm.generation.modes import MODES, mode_names

    p = sub.add_parser("serve", parents=list(parents), help="serve a checkpoint over an OpenAI-compatible HTTP API",
                       description="Continuous batching over --slots KV-cache rows; /v1/completions, "
                                   "/v1/chat/completions, /v1/models, /health, /metrics (docs/serving.md).")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder; default: the embedded default model")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a folder of tokenizer files or a tokenizer.json; default: the checkpoint's")
    p.add_argument("--mode", default=None, choices=mode_names(),
                   help="; ".join(f"{m.name}: {m.summary}" for m in MODES.values())
                        + "; default: linear_spec (ar for a model without a MASK token)")
    p.add_argument("--slots", type=_int_in(1), default=8, help="concurrent requests (KV-cache rows)")
    p.add_argument("--max-len", type=_int_in(1), default=1024,
                   help="cache slots per row: prompt + max_tokens + the mode's widest pass must fit")
    p.add_argument("--max-tokens", type=_int_in(1), default=512, help="the largest max_tokens a request may ask")
    p.add_argument("--block-length", type=_int_in(1), default=None,
                   help="diffusion / draft block length; default: the model's training block")
    p.add_argument("--spec-sampling", default="exact", choices=("exact", "rejection"))
    p.add_argument("--dtype", default=None, choices=DTYPES, help="parameter dtype; default: as stored")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000)
    p.add_argument("--model-name", default="jaxdlm", help="the model id the API reports and accepts")
    p.add_argument("--max-queue", type=_int_in(1), default=256,
                   help="requests that may wait for a slot; more get 503 with Retry-After")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the tokenizer's)")
    p.add_argument("--logprobs", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each token's log-probability, for requests that ask for logprobs (default on; "
                        "--no-logprobs skips the work)")
    p.add_argument("--cycles-per-step", type=_int_in(1), default=1,
                   help="decoding cycles per engine dispatch while no request waits (a finished request still ends "
                        "the dispatch): more hides the host's per-step cost, but a stream chunk then spans several "
                        "passes (default 1: one chunk per pass)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
    return p


def cmd_train(args) -> int:
    from jaxdlm.training.run import run_command

    return run_command(args)


# ------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxdlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument("--no-compile-cache", action="store_true",
                        help=f"do not use JAX's persistent compilation cache (${CACHE_DIR_ENV}, default "
                             f"{DEFAULT_CACHE_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", parents=[common], help="run every decoding mode of the embedded default model")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    p.add_argument("--max-new-tokens", type=_int_in(1), default=128)
    p.add_argument("--num-prompts", type=_int_in(1), default=1, help="held-out prompts decoded as one batch")
    p.add_argument("--prompt-index", type=_int_in(0), default=6,
                   help="first held-out prompt to use (0-15; default 6: a typical one, TPF near the median)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", parents=[common], help="devices, versions, and a model config or checkpoint")
    p.add_argument("--config", nargs="?", const="default", default=None, metavar="PATH",
                   help="a Hugging Face config.json (file or folder), a jaxdlm checkpoint folder or a training run "
                        "folder; "
                        "no PATH (or 'default'): the embedded default model")
    p.set_defaults(func=cmd_info)
    add_generate_parser(sub, parents=[common])
    add_serve_parser(sub, parents=[common])
    p = sub.add_parser("train", parents=[common], help="train / fine-tune from a TOML or JSON experiment config")
    from jaxdlm.training.run import add_arguments as _train_arguments

    _train_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def add_generate_parser(sub, parents=()):
    """The ``generate`` subcommand; its modes and policies are read from the library's registries."""
    from jaxdlm.generation.modes import MODES, mode_names
    from jaxdlm.generation.policies import POLICIES, REGISTRY

    p = sub.add_parser("generate", parents=list(parents), help="generate text from a checkpoint",
                       description="Generate with a jaxdlm checkpoint (its tokenizer and chat template). Prints "
                                   "each prompt (dimmed on a terminal, else followed by \u2502) and its "
                                   "continuation, why it stopped, then nfe, TPF, compile and run time.")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder (jaxdlm.load), or a training run folder (its latest parameters and LoRA, "
                        "jaxdlm.training.load_trained); default: the embedded default model, a small byte-level "
                        "Python code model")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a folder of tokenizer files or a tokenizer.json; default: the checkpoint's (a training run "
                        "folder holds none: pass the one its data was made with)")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    p.add_argument("--mode", default="auto", choices=mode_names() + ("auto",),
                   help="; ".join(f"{m.name}: {m.summary}" for m in MODES.values())
                        + "; auto: ar or linear_spec by jaxdlm.generation.auto_mode (default)")
    p.add_argument("--max-new-tokens", type=_int_in(1), default=256)
    p.add_argument("--block-length", type=_int_in(1), default=None,
                   help="diffusion / draft block length; default: the model's training block (config.block_size). "
                        "Another value is allowed with a note; linear_spec and quadratic_spec need >= 2 "
                        f"(quadratic_spec <= {MODES['quadratic_spec'].max_block}); --mode ar ignores it (one token "
                        "per forward)")
    p.add_argument("--threshold", type=_float_in(0.0, 1.0, none_word="none"), default=0.9,
                   help="diffusion confidence threshold in [0, 1]; 'none' = the fixed schedule (one masked token "
                        "per denoise step unless --steps-per-block)")
    p.add_argument("--steps-per-block", type=_int_in(1), default=None,
                   help="denoise steps per block of the fixed schedule (--threshold none); default block length - 1")
    p.add_argument("--policy", default="confidence", choices=POLICIES,
                   help="diffusion commit policy (default confidence): " + "; ".join(
                       f"{pol.name} reads --{pol.knob.replace('_', '-')}" for pol in REGISTRY))
    for pol in REGISTRY:
        if pol.knob != "threshold":
            p.add_argument(f"--{pol.knob.replace('_', '-')}", type=_float_in(pol.low, None if math.isinf(pol.high) else pol.high),
                           default=None, help=f"--policy {pol.name} only: {pol.meaning}, {pol.range_text} "
                                              f"(default {pol.default})")
    p.add_argument("--temperature", type=_float_in(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_int_in(1), default=None)
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=None)
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    p.add_argument("--spec-sampling", default="exact", choices=("exact", "rejection"))
    p.add_argument("--eos-token-id", type=_int_in(0), action="append",
                   help="an id that ends a row (repeat for several; each must lie in the vocabulary); default: the "
                        "config's EOS ids")
    p.add_argument("--max-thinking-tokens", type=_int_in(0), default=None)
    p.add_argument("--end-think-token-id", type=_int_in(0), default=None)
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="parameter dtype; default: as stored (bfloat16 with --quantize)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE,
                   help="quantize the linear weights while loading a float checkpoint (weight-only; computes in "
                        "bfloat16): int8 / fp8 per output channel, int4 in groups of 128 inputs")
    p.add_argument("--quantize-head", action="store_true", help="with --quantize: quantize the output head too")
    p.add_argument("--warmup", action="store_true", help="run once first, so that the timed run compiles nothing")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a line counting committed tokens on stderr (default: when stderr is a terminal; "
                        "JAX's compile cache does not keep a program with it)")
    p.set_defaults(func=cmd_generate)
    return p


def main(argv=None) -> int:
    # transformers prints "PyTorch was not found..." at import without torch; the CLI needs only its tokenizers
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    try:
        _configure_compile_cache(args)
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"jaxdlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line per error is the contract; --debug shows the traceback
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, ValueError):  # not a message written for the user: say what it is and where to look
            msg = f"{type(e).__name__}: {msg} (--debug shows the traceback)"
        print(f"jaxdlm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
