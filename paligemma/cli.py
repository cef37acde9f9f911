"""The command line: ask a checkpoint a question about an image.

    python -m paligemma --image images/shapes_1.png --prompt "caption en"               # the shipped tiny-shapes
    python -m paligemma --image cat.jpg --prompt "caption en" --model path/to/checkpoint
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import PaliGemmaError

DEFAULT_MODEL_ENV = "PALIGEMMA_MODEL"
DEFAULT_MODEL = "tiny-shapes"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m paligemma", description="Answer a prompt about an image with PaliGemma.")
    parser.add_argument("--image", required=True, help="image file (any format PIL reads)")
    parser.add_argument("--prompt", required=True, help='task prompt, e.g. "caption en", "answer en what is this?", "detect cat"')
    parser.add_argument("--model", default=os.environ.get(DEFAULT_MODEL_ENV) or DEFAULT_MODEL,
                        help="checkpoint folder in the Hugging Face layout, or the name of a model shipped with the "
                             f"package (default: ${DEFAULT_MODEL_ENV}, else {DEFAULT_MODEL!r}, trained on shapes)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens up to this probability mass")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static", "graph", "compiled"],  # generation.CACHES
                        help="KV cache: dynamic (default), static, graph (fixed-shape steps, CUDA graphs on a GPU) "
                        "or compiled (those steps compiled by torch.compile first: slow to start, faster after)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch

        from .checkpoint import load_pretrained
        from .generation import check_generation_settings, generate
        from .processing import load_image

        check_generation_settings(args.max_new_tokens, args.sample, args.temperature, args.top_k, args.top_p)
        image = load_image(args.image)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
        model, processor = load_pretrained(args.model, device=device, dtype=dtype, progress=sys.stderr.isatty())
        answer = generate(
            model, processor, images=[image], prompts=[args.prompt], max_new_tokens=args.max_new_tokens,
            do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            cache=args.cache,
        )[0]
    except PaliGemmaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(answer)
    return 0
