"""The command line: one program with a subcommand per job, and one error handler.

    paligemma ask --image images/shapes_1.png --prompt "caption en"       # the shipped tiny-shapes model
    paligemma ask --image cat.jpg --prompt "caption en" --model path/to/checkpoint
    paligemma ask --image a.jpg --image b.jpg --prompt "answer en what changed?" --model path/to/checkpoint
    paligemma train --out runs/tiny-shapes                                # pretrain tiny-shapes
    paligemma evaluate paligemma/checkpoints/tiny-shapes --examples 500   # score on held-out scenes
    paligemma finetune --model tiny-shapes --train data/train.jsonl --eval data/val.jsonl --method lora --out runs/x
    paligemma bench --preset small                                        # this library against transformers
    paligemma attention score --scenes 200                                # does the answer look at the shape?
    paligemma attention plot --image images/shapes_1.png --prompt "caption en" --out maps.png
    paligemma attention export --image images/shapes_1.png --prompt "caption en" --out maps.json --html maps.html

`python -m paligemma` is the same program, and with no subcommand it asks (`python -m paligemma --image ... --prompt
...`). Bad input ends the program with `error: <what is wrong>` on one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import PaliGemmaError

DEFAULT_MODEL_ENV = "PALIGEMMA_MODEL"
DEFAULT_MODEL = "tiny-shapes"
Command = Callable[[argparse.Namespace], int]


def _model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=os.environ.get(DEFAULT_MODEL_ENV) or DEFAULT_MODEL,
                        help="checkpoint folder in the Hugging Face layout, or the name of a model shipped with the "
                             f"package (default: ${DEFAULT_MODEL_ENV}, else {DEFAULT_MODEL!r}, trained on shapes)")


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


# --- ask ---------------------------------------------------------------------------------------------------------


def _add_ask(commands: argparse._SubParsersAction) -> None:
    from .inference.decoders import CACHES
    from .io.checkpoint import DTYPE_NAMES

    ask = commands.add_parser("ask", help="answer a prompt about an image",
                              description="Answer a prompt about an image with PaliGemma.")
    ask.add_argument("--image", required=True, action="append",
                     help="image file (any format PIL reads); repeat it for several images in one prompt, in order")
    ask.add_argument("--prompt", required=True,
                     help='task prompt, e.g. "caption en", "answer en what is this?", "detect cat"')
    _model_argument(ask)
    ask.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    ask.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ask.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    ask.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ask.add_argument("--top-p", type=float, default=1.0,
                     help="sample among the most likely tokens up to this probability mass")
    ask.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    ask.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ask.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                     help="weights dtype (default: bf16 on cuda, fp32 on cpu)")
    ask.add_argument("--quantization", default=None, choices=["int8", "int4"],
                     help="quantize the linear layers as they load: int8 per row, or int4 in groups (--group-size)")
    ask.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], help="int4's group (default 128)")
    ask.add_argument("--cache", default="dynamic", choices=CACHES,
                     help="KV cache: dynamic (default), static, graph (fixed-shape steps, CUDA graphs on a GPU) "
                     "or compiled (those steps compiled by torch.compile first: slow to start, faster after)")
    ask.set_defaults(run=_ask)


def _ask(args: argparse.Namespace) -> int:
    from .inference.generation import generate
    from .inference.sampling import GenerationSettings
    from .io.checkpoint import load_pretrained
    from .io.images import load_image

    settings = GenerationSettings(args.max_new_tokens, args.sample, args.temperature, args.top_k, args.top_p,
                                  args.seed)  # refuse bad settings before loading anything
    images = [load_image(path) for path in args.image]  # one or more, all for the one prompt
    device = _device(args.device)
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    model, processor = load_pretrained(args.model, device=device, dtype=dtype, progress=sys.stderr.isatty(),
                                       quantization=args.quantization, group_size=args.group_size)
    answer = generate(model, processor, images=[images], prompts=[args.prompt], cache=args.cache,
                      **dataclasses.asdict(settings))[0]
    print(answer)
    return 0


# --- train and evaluate --------------------------------------------------------------------------------------------


def _add_train(commands: argparse._SubParsersAction) -> None:
    from .io.checkpoint import DTYPE_NAMES
    from .training.pretrain import PRECISIONS, TrainSettings

    train = commands.add_parser("train", help="pretrain the tiny-shapes model on the shapes world",
                                description="Train a small PaliGemma on the shapes world, on CPU or CUDA "
                                "(resuming from OUT/train_state.pt when present).")
    train.add_argument("--out", required=True, help="folder for the checkpoint, the tokenizer and the resume state")
    for field in dataclasses.fields(TrainSettings):
        choices = PRECISIONS if field.name == "precision" else None
        train.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                           choices=choices, help=f"(default {field.default})")
    train.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on held-out shapes scenes",
                                   description="Score a checkpoint on held-out scenes of the shapes world.")
    evaluate.add_argument("model", help="checkpoint folder or shipped name")
    evaluate.add_argument("--examples", type=int, default=500, help="held-out scenes (default 500)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES, help="weights dtype (default fp32)")
    evaluate.add_argument("--quantization", default=None, choices=["int8", "int4"],
                          help="quantize the linear layers as they load: int8 per row, or int4 in groups")
    evaluate.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], help="int4's group")
    evaluate.set_defaults(run=_evaluate)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        if threads < 1:
            raise PaliGemmaError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> int:
    from .training.pretrain import TrainSettings, train

    _set_threads(args.threads)
    settings = TrainSettings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(TrainSettings)})
    train(args.out, settings)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .training.pretrain import evaluate_checkpoint

    if args.examples < 1:
        raise PaliGemmaError(f"--examples must be at least 1, got {args.examples}")
    print(json.dumps(evaluate_checkpoint(args.model, args.examples, device=args.device, dtype=args.dtype,
                                         quantization=args.quantization, group_size=args.group_size), indent=2))
    return 0


# --- finetune ------------------------------------------------------------------------------------------------------

FINETUNE_HELP = {
    "method": "what trains: full, freeze-vision (tower and projector frozen), attention (the decoder's q, k, v, o) "
              "or lora (low-rank adapters, the rest frozen)",
    "batch_size": "examples per optimiser step (with --distributed, over all processes together)",
    "grad_accumulation": "split each step's batch into this many micro-batches (less memory, same result)",
    "warmup_fraction": "share of the steps spent warming the learning rate up linearly; a cosine decay follows",
    "optimizer": "adamw or sgd",
    "lora_targets": "comma-separated projections to adapt",
    "lora_parts": "where: language_model, vision_tower, or both, comma-separated",
    "precision": "fp32, or bf16: products under bf16 autocast, frozen weights kept in bf16 (default: bf16 on a GPU, "
                 "fp32 on a CPU, where bf16 autocast was measured no faster: see the README)",
    "activation_checkpointing": "recompute activations layer by layer in the backward pass (less memory)",
    "from_scratch": "start from random weights instead of the checkpoint's (a baseline)",
    "eval_examples": "held-out examples to score (0: all)",
}


def _add_finetune(commands: argparse._SubParsersAction) -> None:
    from .training.distributed import STRATEGIES
    from .training.finetune import OPTIMIZERS, PRECISIONS, FinetuneSettings
    from .training.methods import METHODS

    finetune = commands.add_parser(
        "finetune", help="fine-tune a checkpoint on a JSONL file of images, prompts and answers",
        description="Fine-tune PaliGemma on your data: a JSONL file, one example a line, "
        '{"image": PATH or "images": [PATHS], "prefix": PROMPT, "suffix": ANSWER}, paths relative to the file. '
        "Writes OUT/model (merged, Hugging Face layout), OUT/adapter (LoRA, PEFT layout) and OUT/record.json.")
    _model_argument(finetune)
    finetune.add_argument("--train", required=True, help="JSONL file of training examples")
    finetune.add_argument("--eval", default=None, help="JSONL file of held-out examples, scored every --eval-every")
    finetune.add_argument("--out", required=True, help="folder for the model, the adapter, the record and the "
                          "checkpoint to resume from")
    finetune.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    choices = {"method": METHODS, "optimizer": OPTIMIZERS, "precision": PRECISIONS}
    for field in dataclasses.fields(FinetuneSettings):
        flag, default = f"--{field.name.replace('_', '-')}", field.default
        help_text = f"{FINETUNE_HELP.get(field.name, '')} (default {default})".strip()
        if isinstance(default, bool):
            finetune.add_argument(flag, action="store_true", help=help_text)
        elif isinstance(default, tuple):
            finetune.add_argument(flag, type=lambda text: tuple(t.strip() for t in text.split(",") if t.strip()),
                                  default=default,
                                  help=f"{FINETUNE_HELP[field.name]} (default {','.join(default)})")
        elif field.name == "precision":
            finetune.add_argument(flag, default=None, choices=PRECISIONS, help=FINETUNE_HELP["precision"])
        else:
            finetune.add_argument(flag, type=type(default), default=default, choices=choices.get(field.name),
                                  help=help_text)
    finetune.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    finetune.add_argument("--threads", type=int, default=None, help="CPU threads for torch (per process)")
    finetune.add_argument("--distributed", choices=STRATEGIES, default=None,
                          help="under torchrun: ddp (every process holds the whole model) or fsdp (each holds a "
                          "shard of every layer); NCCL on GPUs, gloo on CPUs")
    finetune.add_argument("--cpu-offload", action="store_true",
                          help="fsdp: keep the sharded weights, gradients and optimiser state in CPU memory")
    finetune.add_argument("--no-reshard-after-forward", action="store_true",
                          help="fsdp: keep each layer's gathered weights from the forward to the backward pass "
                          "(faster, more memory)")
    finetune.set_defaults(run=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from .training import distributed as parallel
    from .training.finetune import FinetuneSettings, finetune
    from .training.resume import latest_checkpoint

    _set_threads(args.threads)
    device = _device(args.device)
    if args.precision is None:
        args.precision = "bf16" if device.startswith("cuda") else "fp32"
    settings = FinetuneSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneSettings)})
    if args.distributed is None:
        if args.cpu_offload or args.no_reshard_after_forward:
            raise PaliGemmaError("--cpu-offload and --no-reshard-after-forward need --distributed fsdp")
        parallel.refuse_lone_torchrun_workers()
        record = finetune(args.model, args.train, args.out, settings, eval_file=args.eval, device=device,
                          resume=args.resume)
    else:
        layout = parallel.DistributedSettings(args.distributed, not args.no_reshard_after_forward, args.cpu_offload)
        world, device = parallel.join_group(device)
        # After a lost worker torchrun restarts every rank with the same command: go on from the last checkpoint.
        resume = args.resume or (parallel.restarted_by_torchrun() and latest_checkpoint(args.out) is not None)
        record = parallel.on_every_rank(world, lambda: finetune(
            args.model, args.train, args.out, settings, eval_file=args.eval, device=device, resume=resume,
            world=world, distributed=layout))
        parallel.leave_group()
        if not world.is_main:
            return 0
    last = record["evaluations"][-1] if record["evaluations"] else None
    summary = f", held-out score {last['score']:.3f}" if last else ""
    print(f"fine-tuned {record['trainable_parameters']:,} of {record['parameters']:,} parameters for "
          f"{record['settings']['steps']} steps{summary}; written to {args.out}")
    return 0


# --- bench ---------------------------------------------------------------------------------------------------------


def _add_bench(commands: argparse._SubParsersAction) -> None:
    from .bench import PRESETS
    from .inference.decoders import CACHES

    bench = commands.add_parser("bench", help="this library against transformers, and the machine's limits",
                                description="Benchmark this library against transformers on the same random "
                                "weights, with the machine's memory bandwidth and matrix throughput as bounds.")
    bench.add_argument("--preset", choices=sorted(PRESETS), default="3b-224")
    bench.add_argument("--dtype", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    bench.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=2, help="alternating runs of each implementation at batch 1 "
                       "(the best is kept)")
    bench.add_argument("--large-batch-repeats", type=int, default=1, help="the same at larger batches")
    bench.add_argument("--load-repeats", type=int, default=2)
    bench.add_argument("--profile", action="store_true",
                       help="where the time goes (torch.profiler), first dtype, batch 1")
    bench.add_argument("--ablation", action="store_true", help="each fast path off and on, first dtype, batch 1")
    bench.add_argument("--baseline-library", default=None, help="with --ablation: a folder holding an earlier "
                       "version of the paligemma package, whose loading is measured too")
    bench.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer for the bandwidth measurement")
    bench.add_argument("--no-load", action="store_true", help="skip the checkpoint loading measurements")
    bench.add_argument("--no-limits", action="store_true", help="skip measuring bandwidth and matmul throughput")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--decode-cache", choices=CACHES, default=None,
                       help="how this library decodes (default: graph on a GPU, dynamic on a CPU); compiled: the "
                       "fixed-shape step compiled by torch.compile first")
    bench.add_argument("--workdir", default=None, help="where to write the temporary checkpoint")
    bench.add_argument("--json", default=None, help="write the report here")
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run

    if args.new_tokens < 2:
        raise PaliGemmaError("--new-tokens must be at least 2 (the decode rate is measured after the first token)")
    _set_threads(args.threads)
    report = run(args.preset, tuple(args.dtype), tuple(args.batch), args.new_tokens, args.repeats,
                 args.large_batch_repeats, args.load_repeats, args.device, args.workdir, not args.no_load,
                 not args.no_limits, args.bandwidth_mb << 20, args.profile, args.ablation, args.baseline_library,
                 args.decode_cache,
                 log=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True))
    report["command"] = "python -m paligemma.bench " + " ".join(args.argv)
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


# --- attention -----------------------------------------------------------------------------------------------------


def _reduction(text: str) -> str | int:
    return int(text) if text.lstrip("-").isdigit() else text


def _add_attention(commands: argparse._SubParsersAction) -> None:
    from .interpret.localisation import LOCALISATION_SEED

    attention = commands.add_parser("attention", help="attention maps: the localisation score, plots, or an export",
                                    description="Where PaliGemma looks: score, draw or export its attention maps.")
    jobs = attention.add_subparsers(dest="job", required=True)
    score = jobs.add_parser("score", help="measure whether the answer looks at the asked shape (shapes world)")
    score.add_argument("--scenes", type=int, default=200, help="colour questions to ask (default 200)")
    score.add_argument("--seed", type=int, default=LOCALISATION_SEED, help="seed of the scenes")
    plot = jobs.add_parser("plot", help="draw the maps of one image and prompt into a PNG file")
    plot.add_argument("--image", required=True)
    plot.add_argument("--prompt", required=True)
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.add_argument("--max-new-tokens", type=int, default=8)
    export = jobs.add_parser(
        "export", help="capture the maps of images and prompts into one file for the browser viewer",
        description="Capture every image with every prompt, and write the maps the attention viewer shows (8-bit, "
                    "one maximum a row) into one JSON file; --html also writes a page with the viewer.")
    export.add_argument("--image", required=True, action="append", help="an image file (repeat for several)")
    export.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for several)")
    export.add_argument("--out", required=True, help="JSON file to write")
    export.add_argument("--html", help="also write a self-contained HTML page with the viewer")
    export.add_argument("--max-new-tokens", type=int, default=16)
    export.add_argument("--no-siglip-layers", action="store_true",
                        help="leave out SigLIP's per-layer maps (layers x patches^2 bytes; the rollout stays)")
    for job in (score, plot, export):
        job.add_argument("--model", default="tiny-shapes", help="checkpoint folder or shipped name")
        job.add_argument("--device", default="cpu")
    for job in (score, plot):
        job.add_argument("--layers", default="-1", help="'mean', 'max' or a decoder layer (default -1, the last)")
        job.add_argument("--heads", default="mean", help="'mean', 'max' or a head (default mean)")
    attention.set_defaults(run=_attention)


def _attention(args: argparse.Namespace) -> int:
    from .io.checkpoint import load_pretrained

    if args.job == "export":
        return _attention_export(args)
    model, processor = load_pretrained(args.model, device=args.device)
    layers, heads = _reduction(args.layers), _reduction(args.heads)
    if args.job == "score":
        from .interpret.localisation import localisation_score

        print(localisation_score(model, processor, args.scenes, args.seed, layers, heads).summary())
        return 0
    import matplotlib

    matplotlib.use("Agg")
    from .interpret.capture import attention_maps
    from .interpret.plots import plot_tokens

    maps = attention_maps(model, processor, args.image, args.prompt, max_new_tokens=args.max_new_tokens)
    plot_tokens(maps, layers=layers, heads=heads).savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"{maps.text!r}: {len(maps.tokens)} maps written to {args.out}")
    return 0


def _attention_export(args: argparse.Namespace) -> int:
    from .interpret.capture import attention_maps
    from .interpret.export import export_attention, write_attention_export
    from .io.checkpoint import load_pretrained

    for option in (args.out, args.html):
        if option and not Path(option).resolve().parent.is_dir():
            raise PaliGemmaError(f"cannot write {option}: its folder does not exist")
    model, processor = load_pretrained(args.model, device=args.device)
    records = []
    for image in args.image:
        for prompt in args.prompt:
            maps = attention_maps(model, processor, image, prompt, max_new_tokens=args.max_new_tokens)
            records.append(export_attention(maps, label=f"{Path(image).name}: {prompt}",
                                            siglip_layers=not args.no_siglip_layers))
            print(f"{Path(image).name}: {prompt!r} -> {maps.text!r}")
    size = write_attention_export(args.out, records)
    print(f"{len(records)} examples, {size / 1e3:.0f} kB (8-bit maps) written to {args.out}")
    if args.html:
        from .interpret.viewer import write_viewer_page

        page = write_viewer_page(args.html, args.out)
        print(f"viewer page, {page / 1e3:.0f} kB with its data, written to {args.html}")
    return 0


# --- the program ---------------------------------------------------------------------------------------------------

SUBCOMMANDS = ("ask", "train", "evaluate", "finetune", "bench", "attention")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paligemma", description="PaliGemma from scratch: ask, train, evaluate, "
                                     "benchmark and look inside.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for add in (_add_ask, _add_train, _add_finetune, _add_bench, _add_attention):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; `argv` without a subcommand (`--image ... --prompt ...`) means `ask`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["ask", *argv]
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    try:
        return args.run(args)
    except PaliGemmaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
