"""Our exported GGUF in llama.cpp beside our packed model: perplexity, greedy agreement, speed.

The model is a finished trial (`--source RUN_ID|DIR`) or, without one, a model of `--size`
built here with a byte-level BPE tokenizer trained on the text file, its weights random or
trained `--train-steps` AdamW steps on the same text. It is exported with `ternarylm export
--format gguf --type tq2_0 --fallback q8_0 --pad-ffn` (every block linear TQ2_0, the MLP hidden
size zero-padded to a multiple of 256; embedding and head q8_0, as llama.cpp's own TQ2_0 files
keep them) and packed with `ternarylm pack` (int8 embedding and head), then:

  perplexity   over the text file in disjoint windows of the model's context, llama.cpp
               (llama-cpp-python, logits of every position) and our packed model;
  greedy       the tokens each decodes greedily from the same prompt ids, and how many agree
               (up to the first difference, and position by position);
  tokenizer    whether llama.cpp's gpt2 tokenizer gives our token ids for the text;
  decode       median ms per token at batch 1 with a KV cache at each thread count (default
               1 and 2) of four engines taking turns token by token (so that machine load hits
               all alike): llama.cpp on the TQ2_0 file and on an F32 export of the same model,
               our packed model and our FP32 reference (the same weights dequantized, packed as
               floats); the packed model's speedup is given over both FP32 engines.

Both quantize activations to 8 bits, but differently: ours per token, llama.cpp's TQ2_0 dot
product per 256-element block (Q8_K), so logits are close, not equal. llama.cpp's timing goes
through llama-cpp-python's `eval` (a little Python per token, as ours has).

llama-cpp-python is installed with pip if missing (it builds llama.cpp from source: minutes of
every core); `--no-install` fails instead.

    python benchmarks/llama_cpp_check.py [--source DIR] [--size paper-132m] [--json]

With --json the last line is one JSON object of every figure.
"""

import os
import sys


import argparse
import importlib
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ternarylm.deploy.artifacts import load_trained, save_trained
from ternarylm.config import TrialConfig
from ternarylm.data import build_tokenizer, eos_id
from ternarylm.deploy.export import export_gguf
from ternarylm.model.transformer import TernaryLM, model_config
from ternarylm.deploy.inference import load_packed
from ternarylm.deploy.packing import pack_model
from ternarylm.model.plans import apply_plan, convert

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = Path(os.environ.get("TERNARYLM_SHARED_DATA", REPO.parent / "shared" / "data")
                    ) / "tinystories" / "tinystories_sample.txt"
PROMPT_TOKENS = 16
WARMUP_TOKENS = 4


def ensure_llama_cpp(install: bool):
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        if not install:
            sys.exit("llama-cpp-python is not installed (pip install llama-cpp-python)")
    print("installing llama-cpp-python (builds llama.cpp from source; takes minutes)...",
          file=sys.stderr, flush=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    # Only the libraries this check loads: no multimodal library, examples, tests or server.
    env.setdefault("CMAKE_ARGS", "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                                 "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "
                                 "-DGGML_NATIVE=ON")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True,
                   env=env)
    print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return importlib.import_module("llama_cpp")


def build_model(size: str, vocab: int, text: str, train_steps: int, seq_len: int,
                directory: Path) -> Path:
    """A trained-model directory of `size` with a bpe tokenizer trained on `text`."""
    tokenizer = build_tokenizer(f"bpe:{vocab}", [text])
    trial = TrialConfig(size=size, scheme="absmean", plan="all_ternary", seq_len=seq_len)
    torch.manual_seed(0)
    # The model keeps `vocab` rows even where the text is too small for that many merges, so
    # the shapes (and the speed) are those of the size asked for.
    model = TernaryLM(model_config(size, vocab_size=max(vocab, tokenizer.get_vocab_size()),
                                   seq_len=seq_len))
    formats = apply_plan(model, trial.plan, trial.scheme, model.cfg.n_layers)
    if train_steps:
        ids = torch.tensor(tokenizer.encode(text).ids)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(train_steps):
            starts = torch.randint(0, len(ids) - seq_len - 1, (8, 1)) + torch.arange(seq_len + 1)
            loss = model.loss(ids[starts[:, :-1]], ids[starts[:, 1:]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == train_steps - 1:
                print(f"train step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return save_trained(directory / "model", model.eval(), trial, formats, tokenizer,
                        eos_id(tokenizer))


def windows(ids: list[int], seq_len: int, eos: int, max_tokens: int) -> list[list[int]]:
    """Disjoint windows [eos, t0 .. t_{seq_len-1}] covering up to max_tokens tokens."""
    ids = ids[:max_tokens]
    return [[eos, *ids[i:i + seq_len]] for i in range(0, len(ids) - 1, seq_len)
            if len(ids[i:i + seq_len]) > 1]


def nll(logits: np.ndarray, targets: list[int]) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


@torch.inference_mode()
def ours_perplexity(packed, wins: list[list[int]]) -> float:
    total, n = 0.0, 0
    for w in wins:
        logits = packed(torch.tensor([w[:-1]]))[0].float().numpy()
        total += nll(logits, w[1:])
        n += len(w) - 1
    return math.exp(total / n)


def llama_perplexity(llm, wins: list[list[int]]) -> float:
    total, n = 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w[:-1])
        logits = np.asarray(llm.scores[:len(w) - 1])
        total += nll(logits, w[1:])
        n += len(w) - 1
    return math.exp(total / n)


@torch.inference_mode()
def ours_greedy(packed, prompt: list[int], n: int) -> list[int]:
    cache = packed.new_cache()
    logits = packed(torch.tensor([prompt]), cache)[0, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        if cache.length == packed.cfg.seq_len:
            break
        logits = packed(torch.tensor([out[-1:]]), cache)[0, -1]
    return out


def llama_greedy(llm, prompt: list[int], n: int, seq_len: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if llm.n_tokens == seq_len:
            break
        llm.eval(out[-1:])
    return out


@torch.inference_mode()
def decode_ms(llama_cpp, ggufs: dict[str, Path], ours: dict[str, object], threads: int,
              n_tokens: int, vocab: int, seq_len: int) -> dict:
    """Median ms/token of each engine, taking turns token by token: llama.cpp on `ggufs`
    ("tq2_0", "f32") and ours on `ours` ("packed", "fp32"); and the speedups between them."""
    torch.set_num_threads(threads)
    n_tokens = min(n_tokens, seq_len - PROMPT_TOKENS - WARMUP_TOKENS)
    ids = torch.randint(0, vocab, (PROMPT_TOKENS + WARMUP_TOKENS + n_tokens,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    steps, llms = {}, []
    for name, path in ggufs.items():
        # logits_all: llama-cpp-python copies a step's logits to `scores` only then (we argmax
        # them as our model's are); one row of copying is little beside a decode step.
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=seq_len, n_threads=threads,
                              n_threads_batch=threads, n_batch=seq_len, logits_all=True,
                              verbose=False)
        llms.append(llm)
        llm.reset()
        llm.eval(ids[:PROMPT_TOKENS])

        def llama_step(token: int, llm=llm) -> None:
            llm.eval([token])
            int(np.argmax(llm.scores[llm.n_tokens - 1]))
        steps[f"llama_cpp_{name}"] = llama_step
    for name, model in ours.items():
        cache = model.new_cache()
        model(torch.tensor([ids[:PROMPT_TOKENS]]), cache)

        def our_step(token: int, model=model, cache=cache) -> None:
            model(torch.tensor([[token]]), cache)[0, -1].argmax()
        steps[f"ours_{name}"] = our_step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for t in range(PROMPT_TOKENS, len(ids)):
        for name, step in steps.items():
            start = time.perf_counter()
            step(ids[t])
            if t >= PROMPT_TOKENS + WARMUP_TOKENS:
                times[name].append(1e3 * (time.perf_counter() - start))
    for llm in llms:
        if hasattr(llm, "close"):  # older llama-cpp-python frees its model when collected
            llm.close()
    ms = {name: statistics.median(v) for name, v in times.items()}
    out = {f"{name}_ms_per_token": round(v, 2) for name, v in ms.items()}
    out["ours_over_llama_cpp"] = round(ms["ours_packed"] / ms["llama_cpp_tq2_0"], 2)
    out["packed_speedup_over_our_fp32"] = round(ms["ours_fp32"] / ms["ours_packed"], 2)
    out["packed_speedup_over_llama_cpp_f32"] = round(ms["llama_cpp_f32"] / ms["ours_packed"], 2)
    out["llama_cpp_tq2_0_speedup_over_its_f32"] = round(
        ms["llama_cpp_f32"] / ms["llama_cpp_tq2_0"], 2)
    return out


def fp32_packed(trained, path: Path) -> Path:
    """Our FP32 reference: the same model, every weight dequantized (codes x scales) and
    packed as floats, run by the same inference code."""
    fp32 = TernaryLM(trained.model.cfg)
    fp32.load_state_dict({f"{name}.weight": layer.dequantized()
                          for name, layer in convert(trained.model).items()})
    return pack_model(fp32, path, trained.tokenizer, trained.eos_id, embedding_dtype="fp32").path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="MLflow run id or trained-model directory (default: "
                        "a model of --size built here)")
    parser.add_argument("--gguf", help="an already exported GGUF of --source")
    parser.add_argument("--size", default="paper-132m")
    parser.add_argument("--vocab", type=int, default=30522, help="built model's vocabulary")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="AdamW steps on the text for a built model (0: random weights)")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="text file for perplexity")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="tokens scored")
    parser.add_argument("--greedy-tokens", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=32, help="timed decode steps")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--json", action="store_true", help="end with a JSON line of results")
    args = parser.parse_args()

    llama_cpp = ensure_llama_cpp(not args.no_install)
    text = Path(args.text).read_text(encoding="utf-8")
    # A built model's tokenizer and training see the first 80% of the text, perplexity the rest.
    train_text, eval_text = text[:len(text) * 4 // 5], text[len(text) * 4 // 5:]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        source = args.source or str(build_model(args.size, args.vocab, train_text,
                                                args.train_steps, args.seq_len, d))
        if args.gguf:
            gguf_path = Path(args.gguf)
            note = "(given)"
        else:
            gguf_path = d / "model.gguf"
            result = export_gguf(source, gguf_path, "tq2_0", fallback="q8_0", pad_ffn=True)
            note = result.note()
        trained = load_trained(source)  # packed here: `pack` would log the file to a run
        packed_path = pack_model(trained.model, d / "model.packed.safetensors",
                                 trained.tokenizer, trained.eos_id).path
        f32_gguf = export_gguf(source, d / "model-f32.gguf", "f32").path
        fp32_path = fp32_packed(trained, d / "model.fp32.safetensors")
        del trained
        pm = load_packed(packed_path)
        packed, tok, eos = pm.model, pm.tokenizer, pm.eos_id
        seq_len, vocab = packed.cfg.seq_len, packed.cfg.vocab_size
        print(note, file=sys.stderr)

        # Tokenizer agreement on 20,000 characters of held-out text.
        sample = eval_text[:20_000]
        ours_ids = tok.encode(sample, add_special_tokens=False).ids
        llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=seq_len, n_batch=seq_len,
                              logits_all=True, n_threads=max(args.threads), verbose=False)
        theirs_ids = llm.tokenize(sample.encode(), add_bos=False, special=False)
        same_tokens = ours_ids == list(theirs_ids)

        ids = tok.encode(eval_text, add_special_tokens=False).ids
        wins = windows(ids, seq_len, eos, args.ppl_tokens)
        ppl = {"llama_cpp": round(llama_perplexity(llm, wins), 3),
               "ours_packed": round(ours_perplexity(packed, wins), 3),
               "tokens": sum(len(w) - 1 for w in wins)}

        prompt = [eos, *ids[:PROMPT_TOKENS]]
        g_ours = ours_greedy(packed, prompt, args.greedy_tokens)
        g_theirs = llama_greedy(llm, prompt, args.greedy_tokens, seq_len)
        n = min(len(g_ours), len(g_theirs))
        prefix = next((i for i in range(n) if g_ours[i] != g_theirs[i]), n)
        greedy = {"tokens": n, "agree_prefix": prefix,
                  "agree_fraction": round(sum(a == b for a, b in zip(g_ours, g_theirs)) / n, 3),
                  "ours_text": tok.decode(g_ours), "llama_cpp_text": tok.decode(g_theirs)}
        llm.close() if hasattr(llm, "close") else None

        fp32 = load_packed(fp32_path).model
        speeds = {t: decode_ms(llama_cpp, {"tq2_0": gguf_path, "f32": f32_gguf},
                               {"packed": packed, "fp32": fp32}, t, args.tokens, vocab, seq_len)
                  for t in args.threads}
        out = {"source": args.source or f"built {args.size} (train steps {args.train_steps})",
               "gguf_bytes": gguf_path.stat().st_size, "packed_bytes": packed_path.stat().st_size,
               "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
               "tokenizer_agrees": same_tokens, "perplexity": ppl, "greedy": greedy,
               "decode": speeds}
    print(f"files: GGUF {out['gguf_bytes'] / 2**20:.1f} MiB, packed "
          f"{out['packed_bytes'] / 2**20:.1f} MiB; tokenizer agrees: {same_tokens}")
    print(f"perplexity on {ppl['tokens']} tokens: llama.cpp {ppl['llama_cpp']}, ours "
          f"{ppl['ours_packed']}")
    print(f"greedy: {greedy['agree_prefix']}/{n} tokens agree before the first difference, "
          f"{greedy['agree_fraction']:.0%} position by position")
    for t, s in speeds.items():
        print(f"decode, {t} thread(s), ms/token: llama.cpp TQ2_0 "
              f"{s['llama_cpp_tq2_0_ms_per_token']}, ours packed {s['ours_packed_ms_per_token']} "
              f"({s['ours_over_llama_cpp']}x); llama.cpp F32 {s['llama_cpp_f32_ms_per_token']}, "
              f"ours FP32 {s['ours_fp32_ms_per_token']}; packed speedup over our FP32 "
              f"{s['packed_speedup_over_our_fp32']}x, over llama.cpp's F32 "
              f"{s['packed_speedup_over_llama_cpp_f32']}x")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
