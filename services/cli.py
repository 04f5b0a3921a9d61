"""The ``hybridmoe`` command line: one subcommand per tool or daemon."""

from __future__ import annotations

import argparse
import sys
import time

from shared.checkpoint import CheckpointError


def _cmd_make_model(args: argparse.Namespace) -> int:
    from shared.make_model import PRESETS, describe, make_model

    if args.list:
        for name, (_, _tokenizer, what) in PRESETS.items():
            print(f"{name:18s} {what}")
        return 0
    if not args.preset or not args.out:
        raise SystemExit("hybridmoe make-model: --preset and --out are required (or --list)")
    t0 = time.perf_counter()
    out = make_model(args.preset, args.out, layers=args.layers, quant=args.quant, seed=args.seed,
                     max_shard_bytes=int(args.shard_gb * 2**30), progress=True, device=args.device)
    print(f"{describe(out)}; written in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from shared.make_model import describe, quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, args.quant, max_shard_bytes=int(args.shard_gb * 2**30),
                              progress=True)
    print(describe(out))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from shared.generate import demo_model_path, generate
    from shared.model import DTYPES, load_model
    from shared.tokenizer import Tokenizer

    path = args.model or demo_model_path(progress=True)
    if args.model is None:
        print(f"[using the built-in demo model at {path}; its weights are random, so is its text]",
              file=sys.stderr)
    model = load_model(path, dtype=DTYPES[args.dtype] if args.dtype else None)
    tokenizer = Tokenizer(path)
    t0 = time.perf_counter()
    ids: list[int] = []
    shown = ""
    sys.stdout.write(args.prompt)
    for token in generate(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_p,
                          args.top_k, args.seed):
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    elapsed = time.perf_counter() - t0
    print(f"\n[{len(ids)} tokens in {elapsed:.2f} s, {len(ids) / elapsed:.1f} tok/s, reference loop]",
          file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        from cython_kernels import bench

        bench.run(args.json, threads=args.threads, quick=args.quick, variant=args.variant)
    elif args.what == "serve":
        from services import loadtest

        if not args.url:
            raise ValueError("bench serve needs --url (the server's address, e.g. http://127.0.0.1:8000)")
        report = loadtest.run(args.url, args.concurrency, args.requests, args.prompt_len or 256, args.long_prompt_len,
                              args.long_fraction, args.output_len, args.json, api_key=args.api_key or "",
                              compare_model=args.model, seed=args.seed)
        return 0 if report["errors"] == 0 else 1
    elif args.what == "prefill":
        from services.engine import bench_prefill

        chunks = tuple(int(c) for c in args.chunks.split(",")) if args.chunks else None
        bench_prefill.run(args.preset, args.layers, args.quant, args.model, args.prompt_len, chunks,
                          args.device or "auto", args.json)
    else:
        from services.engine import bench as ebench

        ebench.run(args.preset or "qwen3-30b-a3b", args.layers or 4, args.quant, args.model, args.prompt_len or 256,
                   args.steps, args.json, compare=not args.no_compare, threads=args.threads,
                   device=args.device or "cpu", weights=args.weights)
    return 0


_DAEMONS = ("weights", "router", "prefill", "decode", "gateway")


def _config(args: argparse.Namespace):
    from shared.config import Config

    return Config.load(args.config, **{
        "run_dir": args.run_dir, "model.path": args.model, "log_format": args.log_format,
        "gateway.host": getattr(args, "host", None), "gateway.port": getattr(args, "port", None),
        "prefill.device": getattr(args, "device", None)})


def _cmd_daemon(args: argparse.Namespace) -> int:
    import importlib
    import os

    if args.command == "prefill":
        # Prefill is throughput work that shares the CPU with decode when it has no GPU: its idle
        # OpenMP threads must sleep, not spin on cores that decode's kernels need. libgomp reads
        # this once, when torch loads, so it is set before the import.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = importlib.import_module(f"services.{args.command}")
    return module.main(_config(args), args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from services.serve import serve

    return serve(_config(args))


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (see deploy/hybridmoe.toml)")
    p.add_argument("--model", help="checkpoint folder (overrides model.path; default: the built-in demo model)")
    p.add_argument("--run-dir", help="folder for socket files and the weight manifest (overrides run_dir)")
    p.add_argument("--log-format", choices=["auto", "json", "console"], help="overrides log_format")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridmoe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-model", help="write a random-weight checkpoint in the real Hugging Face format")
    m.add_argument("--preset", help="model shape (see --list)")
    m.add_argument("--out", help="output folder")
    m.add_argument("--layers", type=int, help="number of decoder layers (default: the preset's)")
    m.add_argument("--quant", default="bf16", choices=["bf16", "fp8", "int4", "int4_g32", "int4_g128"],
                   help="bf16; fp8 (DeepSeek's released 128x128 block format); int4 (routed experts, "
                        "groups of 128; int4_g32 for groups of 32)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shard-gb", type=float, default=4.0, help="largest safetensors shard, GiB")
    m.add_argument("--device", default="cpu", help="draw the weights on this device (cuda: real-shaped "
                                                  "layers in seconds; a different random stream than the CPU's)")
    m.add_argument("--list", action="store_true", help="list the presets")
    m.set_defaults(fn=_cmd_make_model)

    q = sub.add_parser("quantize", help="quantize a BF16 checkpoint's routed experts to FP8 or INT4")
    q.add_argument("--model", required=True, help="BF16 checkpoint folder")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--quant", required=True, choices=["fp8", "int4", "int4_g32", "int4_g128"])
    q.add_argument("--shard-gb", type=float, default=4.0)
    q.set_defaults(fn=_cmd_quantize)

    g = sub.add_parser("generate", help="generate text with the reference model (no server)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--model", help="checkpoint folder (default: the built-in demo model)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="compute dtype")
    g.set_defaults(fn=_cmd_generate)

    sv = sub.add_parser("serve", help="start every daemon (weights, router, prefill, decode, gateway) and serve "
                                      "the OpenAI-compatible API until Ctrl-C")
    _add_config_args(sv)
    sv.add_argument("--host", help="gateway address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="gateway port (default 8000; 0 picks a free one)")
    sv.set_defaults(fn=_cmd_serve)

    from services import decode, gateway, prefill, router, weights

    helps = {"weights": "publish the checkpoint into shared memory and keep it there",
             "router": "admission, placement, token relay, failover",
             "prefill": "stream-loading prefill service (GPU, or CPU without one)",
             "decode": "hybrid CPU decode service for one NUMA node",
             "gateway": "OpenAI-compatible HTTP gateway"}
    for name, module in zip(_DAEMONS, (weights, router, prefill, decode, gateway), strict=True):
        d = sub.add_parser(name, help=helps[name])
        _add_config_args(d)
        module.add_arguments(d)
        d.set_defaults(fn=_cmd_daemon)

    b = sub.add_parser("bench", help="benchmarks that print figures (and write JSON)")
    b.add_argument("what", choices=["kernels", "decode", "prefill", "serve"],
                   help="kernels: CPU expert kernels vs memory bandwidth and torch; decode: the engines on a "
                        "real-shaped checkpoint (decode tok/s, roofline fraction, CPU prefill vs transformers); "
                        "prefill: stream-loading prefill on a real-shaped checkpoint (pinned H2D bandwidth, "
                        "copy/compute overlap, tok/s per layer and projected to the full depth); "
                        "serve: a load test of a running server over HTTP (TTFT, TPOT, ITL, throughput)")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument("--threads", type=int, help="threads (default: every CPU this process may use)")
    b.add_argument("--quick", action="store_true", help="one shape and fewer experts (a smoke run)")
    b.add_argument("--variant", help="kernels: the variant to measure (default: the one chosen for this CPU)")
    b.add_argument("--model", help="decode: a checkpoint folder (default: make one from --preset); serve: the "
                                   "served checkpoint, to compare with the in-process decode engine")
    b.add_argument("--preset", help="decode, prefill: make-model preset (default: qwen3-30b-a3b; deepseek-v3 for "
                                    "prefill on a GPU)")
    b.add_argument("--layers", type=int, help="decode, prefill: layers of the made checkpoint (default: 4; 5 for "
                                              "prefill on a GPU, DeepSeek-V3's 3 dense and 2 MoE)")
    b.add_argument("--quant", default="fp8", help="decode, prefill: format of the made checkpoint (default: fp8)")
    b.add_argument("--device", help="decode: where attention runs (default: cpu; the experts are always on the "
                                    "CPU); prefill: the prefill device (default: a GPU if there is one)")
    b.add_argument("--chunks", help="prefill: chunk sizes, comma-separated (default: 4096,16384 on a GPU, 256 on "
                                    "the CPU)")
    b.add_argument("--prompt-len", type=int, help="decode, serve: prompt length (default: 256); prefill: "
                                                  "(default: the largest chunk)")
    b.add_argument("--url", help="serve: the server (e.g. http://127.0.0.1:8000)")
    b.add_argument("--concurrency", type=int, default=4, help="serve: requests in flight (default: 4)")
    b.add_argument("--requests", type=int, default=32, help="serve: requests in all (default: 32)")
    b.add_argument("--output-len", type=int, default=64, help="serve: tokens generated per request (default: 64)")
    b.add_argument("--long-prompt-len", type=int, default=2048,
                   help="serve: length of the long prompts (default: 2048)")
    b.add_argument("--long-fraction", type=float, default=0.1, help="serve: share of long prompts (default: 0.1)")
    b.add_argument("--api-key", help="serve: the server's API key, if it has one")
    b.add_argument("--seed", type=int, default=0, help="serve: seed of the random prompts")
    b.add_argument("--steps", type=int, default=8, help="decode: timed steps per batch size (default: 8)")
    b.add_argument("--no-compare", action="store_true", help="decode: skip the transformers comparison")
    b.add_argument("--weights", choices=("shm", "file"), default="shm",
                   help="decode: read the weights from shared memory, as the decode service does (default), or "
                        "from the checkpoint's files (mapped)")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"hybridmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
