"""The ``vlmscale`` command: data generation and conversion, evaluation.

    vlmscale data demo --out DIR
    vlmscale model init --preset demo --out DIR   (or --spec internvl2-1b: a published shape, random weights)
    vlmscale model convert --from internvl-chat SRC --out DST   (original InternVLChatModel release -> HF)
    vlmscale model convert --to internvl-chat SRC --out DST [--llm internlm2]   (HF -> original format)
    vlmscale data convert llava|sharegpt|openai|preference --json FILE --media-root DIR --out DIR [--workers N]
    vlmscale data convert internvl --json META.json --out DIR      (shard dirs + sources.yaml)
    vlmscale data convert hf --data DIR_OR_FILES --out DIR          (parquet / arrow / save_to_disk)
    vlmscale data index DIR [DIR ...]                               (build the persistent shard index)
    vlmscale data convert yes-no-pairs --shards DIR --out DIR   (yes/no answers -> correctional pairs)
    vlmscale eval SUITE[,SUITE] --model DIR --data DIR [--reference DIR] [--vcd] [--out FILE.json]
    vlmscale eval compare A.json B.json
    vlmscale ewc fisher --model DIR --data DIR --out DIR [--samples N] [--params llm|vision|both]
    vlmscale ckpt convert RUN_DIR --to universal [--tag step-N] [--workers N]   (before a world-size change)
    vlmscale plan --model internvl2-26b --nodes 4 --gpus-per-node 8 --gpu-mem 40 [--zero 3] [--offload none|optimizer|all] [key=value ...]

Distributed (the eval and ewc commands): deepspeed --num_gpus N --no_local_rank --module vlmscale.cli ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32"]
DTYPE_HELP = "auto (default): the precision training would pick on this hardware (vlmscale/precision.py)"


def _dtype(name: str):
    import torch

    from vlmscale.precision import torch_dtype

    return torch_dtype("auto") if name == "auto" else getattr(torch, name)


def _data_demo(args) -> int:
    from vlmscale.data.demo import generate_demo

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; choose a new --out directory", file=sys.stderr)
        return 2
    if args.variant == "cooccur":
        from vlmscale.data.cooccur import generate_cooccur

        meta = generate_cooccur(out, num_train_scenes=args.train_scenes, num_heldout_scenes=args.heldout_scenes,
                                seed=args.seed)
    else:
        meta = generate_demo(out, num_train_scenes=args.train_scenes, num_heldout_scenes=args.heldout_scenes, seed=args.seed)
    print(json.dumps(meta["counts"], indent=2))
    return 0


def _model_init(args) -> int:
    import torch

    from vlmscale.config.schema import ModelConfig
    from vlmscale.model.build import build_model, load_weights_plain, spec_model

    torch.manual_seed(args.seed)
    dtype = _dtype(args.dtype)
    if args.spec:
        model, assets = spec_model(args.spec, dtype=dtype, max_tiles=args.max_tiles)
    else:
        model, assets = build_model(ModelConfig(preset=args.preset), max_tiles=args.max_tiles, dtype=dtype,
                                    load_weights=load_weights_plain)
    out = Path(args.out)
    model.save_pretrained(out, max_shard_size=args.shard_size)
    assets.save(out)
    print(f"wrote an untrained '{args.spec or args.preset}' model ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters) to {out}")
    return 0


def _model_convert(args) -> int:
    from vlmscale.model.internvl_chat import REMOTE_CODE_FILES, INTERNLM2_CODE_FILES, export_original, import_original

    if (args.from_format is None) == (args.to_format is None):
        print("error: give exactly one of --from internvl-chat (import) or --to internvl-chat (export)", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; choose a new --out directory", file=sys.stderr)
        return 2
    if args.from_format:
        import_original(args.src, out, shard_size=args.shard_size)
        print(f"wrote the HF-format model to {out}")
    else:
        export_original(args.src, out, llm=args.llm, shard_size=args.shard_size)
        llm = json.loads((out / "config.json").read_text())["llm_config"]["architectures"][0]
        files = REMOTE_CODE_FILES + (INTERNLM2_CODE_FILES if llm == "InternLM2ForCausalLM" else [])
        print(f"wrote the original-format model ({llm}) to {out}; to load it with the original code, copy these "
              f"files from the matching OpenGVLab release into it: {', '.join(files)}")
    return 0


def _data_convert(args) -> int:
    from vlmscale.data import convert
    from vlmscale.data.video_files import FrameSampling

    if args.video_frames < 1 or (args.video_fps is not None and args.video_fps <= 0):
        raise ValueError("--video-frames must be >= 1 and --video-fps > 0")
    common = {"out_dir": args.out, "shard_size": args.shard_size, "workers": args.workers, "overwrite": args.overwrite,
              "video": FrameSampling(num_frames=args.video_frames, fps=args.video_fps)}
    if args.format == "internvl":
        result = convert.convert_internvl(args.json, **common)
        print(json.dumps(result, indent=2))
        return 0 if result["sources"] else 1
    if args.format == "hf":
        counts = convert.convert_hf(args.data, media_root=args.media_root or ".", messages_column=args.messages_column,
                                    images_column=args.images_column, videos_column=args.videos_column, split=args.split,
                                    **common)
    else:
        fn = {"llava": convert.convert_llava, "sharegpt": convert.convert_sharegpt, "openai": convert.convert_openai,
              "preference": convert.convert_preference}[args.format]
        counts = fn(args.json, image_root=args.media_root or ".", **common)
    print(json.dumps(counts, indent=2))
    return 0 if counts.get("written") else 1


def _data_index(args) -> int:
    from vlmscale.data.shards import ShardDataset

    for path in args.dirs:
        data = ShardDataset(path, workers=args.workers)
        print(f"{path}: {len(data)} samples in {len(data.shards)} shards, index digest {data.digest}")
    return 0


def _yes_no_pairs(args) -> int:
    from vlmscale.data.convert import yes_no_pairs

    counts = yes_no_pairs(args.shards, out_dir=args.out)
    print(json.dumps(counts, indent=2))
    return 0 if counts.get("written") else 1


def _eval(args) -> int:
    from vlmscale.distributed.group import env_dist_info, init_distributed, shutdown
    from vlmscale.distributed.zero import frozen_engine, zero3_config, zero3_model_scope
    from vlmscale.config.load import parse_size
    from vlmscale.eval.generate import VCDConfig
    from vlmscale.eval.suites import drift_reference, format_table, run_suites
    from vlmscale.model.build import load_pretrained

    suites = [s for s in args.suite.split(",") if s]
    if "drift" in suites and not args.reference:
        print("error: the drift suite needs --reference DIR (the model to compare the encoder with)", file=sys.stderr)
        return 2
    dtype = _dtype(args.dtype)
    # partitioned like training (ZeRO-3), on any number of ranks: no rank holds the whole model, and 1 and
    # N ranks compute alike (ZeRO-3 runs its own linear kernel, whose rounding differs from a plain model's)
    try:
        ds_config = zero3_config(args.deepspeed, world_size=env_dist_info().world_size, dtype=dtype)
    except ValueError as exc:
        if env_dist_info().rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    dist = init_distributed()

    def load(path: str):
        with zero3_model_scope(ds_config):
            model, assets = load_pretrained(path, max_tiles=None, dtype=dtype)
        return frozen_engine(model, ds_config).module, assets

    reference = None
    if "drift" in suites:
        ref_model, ref_assets = load(args.reference)
        reference = drift_reference(ref_model, ref_assets, Path(args.data), max_samples=args.max_samples,
                                    rank=dist.rank, world_size=dist.world_size)
        del ref_model
    model, assets = load(args.model)
    vcd = VCDConfig(alpha=args.vcd_alpha, beta=args.vcd_beta) if args.vcd else None
    results = run_suites(model, assets, Path(args.data), suites, rank=dist.rank, world_size=dist.world_size,
                         max_samples=args.max_samples, max_new_tokens=args.max_new_tokens, vcd=vcd,
                         reference=reference, gather_max_bytes=parse_size(args.gather_policy_max_bytes))
    if dist.is_main:
        print(format_table(results))
        if args.out:
            Path(args.out).write_text(json.dumps({"model": args.model, "vcd": args.vcd, **results}, indent=2))
    shutdown()
    return 0


def _eval_compare(args) -> int:
    from vlmscale.eval.suites import compare

    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    print(compare(a, b, names=(Path(args.a).stem, Path(args.b).stem)))
    return 0


def _eval_dispatch(args) -> int:
    if args.suite == "compare":
        if len(args.files) != 2:
            print("usage: vlmscale eval compare A.json B.json", file=sys.stderr)
            return 2
        args.a, args.b = args.files
        return _eval_compare(args)
    if args.files or not args.model or not args.data:
        print("usage: vlmscale eval SUITE[,SUITE] --model DIR --data DIR [--out FILE]", file=sys.stderr)
        return 2
    return _eval(args)


def _ewc_fisher(args) -> int:
    import torch

    from vlmscale.distributed.group import env_dist_info, init_distributed, shutdown
    from vlmscale.distributed.zero import zero3_config
    from vlmscale.regularize.fisher import estimate_fisher

    out = Path(args.out)
    dtype = _dtype(args.dtype)
    problem = None
    if not (Path(args.model) / "config.json").is_file():
        problem = f"--model {args.model}: no config.json there (expected an HF-format export such as <output_dir>/hf)"
    elif not Path(args.data).exists():
        problem = f"--data {args.data} does not exist"
    elif out.exists() and any(out.iterdir()):
        problem = f"--out {out} is not empty; choose a new directory"
    elif args.samples < 1:
        problem = "--samples must be >= 1"
    else:
        try:
            zero3_config(args.deepspeed, world_size=env_dist_info().world_size, dtype=dtype)
        except ValueError as exc:
            problem = str(exc)
    if problem is not None:  # before any process group starts; every rank fails alike
        if env_dist_info().rank == 0:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    dist = init_distributed()
    try:
        meta = estimate_fisher(model_dir=args.model, data_dir=args.data, out_dir=args.out, dist=dist,
                               num_samples=args.samples, params=args.params, dtype=dtype, seed=args.seed,
                               max_seq_len=args.max_seq_len, deepspeed_config=args.deepspeed)
    finally:  # errors after this point are collective: every rank raises them alike
        shutdown()
    if dist.is_main:
        print(json.dumps({k: meta[k] for k in ("params", "samples", "skipped", "numel", "fisher_mean")}, indent=2))
    return 0


def _plan(args) -> int:
    from vlmscale.config import load_config
    from vlmscale.config.schema import AlignConfig, PretrainConfig, PRESETS, SFTConfig
    from vlmscale.plan.report import Cluster, render

    overrides = list(args.overrides)
    if args.model in PRESETS:
        overrides.append(f"model.preset={args.model}")
    elif args.model is not None:
        overrides.append(f"model.init_from={args.model}")
    stage = {"sft": SFTConfig, "align": AlignConfig, "pretrain": PretrainConfig}[args.stage]
    cfg = load_config(stage, path=args.config, overrides=overrides)
    for name in ("nodes", "gpus_per_node", "max_micro_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.reserve < args.gpu_mem:
        raise ValueError("--reserve must be >= 0 and below --gpu-mem")
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem,
                      reserve_gib=args.reserve, device=args.device)
    name = args.model or cfg.model.init_from or cfg.model.preset or f"{cfg.model.vision} + {cfg.model.llm}"
    text, data = render(cfg, cluster, model_name=name, zero=args.zero, offload=args.offload,
                        limit=args.max_micro_batch, tiles=args.tiles)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


def _ckpt_convert(args) -> int:
    """Offline universal conversion of a run's checkpoint (default: the one resume=auto would load)."""
    from vlmscale.train.checkpoint import CheckpointManager, committed_tags
    from vlmscale.distributed.group import DistInfo

    checkpoints = CheckpointManager(args.run_dir, dist=DistInfo(0, 1, 0), keep_last=0)
    tag = args.tag or checkpoints.newest()
    if tag is None or tag not in committed_tags(checkpoints.root):
        raise ValueError(f"{checkpoints.root} holds no complete checkpoint {args.tag or ''}".rstrip()
                         + "; pass --tag step-NNNNNNNN naming one with a COMMITTED marker")
    t0 = time.time()
    dst = checkpoints.prepare_universal(tag, workers=args.workers)
    size = checkpoints.size_bytes(tag)
    seconds = time.time() - t0
    print(json.dumps({"tag": tag, "universal": str(dst), "gb": round(size / 1e9, 4), "seconds": round(seconds, 2),
                      "seconds_per_gb": round(seconds / max(size / 1e9, 1e-9), 2), "workers": args.workers}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmscale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate or convert datasets").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser("demo", help="generate the built-in demo dataset")
    demo.add_argument("--out", required=True)
    demo.add_argument("--train-scenes", type=int, default=6000)
    demo.add_argument("--heldout-scenes", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--variant", choices=["standard", "cooccur"], default="standard",
                      help="cooccur: anchor objects nearly always come with a partner (hallucination study, docs/evaluation.md)")
    demo.set_defaults(func=_data_demo)

    convert = data.add_parser("convert", help="convert an existing dataset into shards")
    fmt = convert.add_subparsers(dest="format", required=True)
    formats = {
        "llava": "LLaVA-format JSON/JSONL (conversations with from: human/gpt, <image> placeholders)",
        "sharegpt": "LLaMA-Factory ShareGPT: messages (role/content) or conversations (from/value), images/videos, system",
        "openai": "OpenAI / TRL content lists: parts of type text, image, image_url, video",
        "internvl": "InternVL meta JSON {name: {root, annotation, repeat_time, length, max_dynamic_patch}} -> "
                    "one shard dir per entry + sources.yaml",
        "hf": "a Hugging Face dataset on disk (parquet/arrow files or save_to_disk) with embedded images",
        "preference": "RLAIF-V / RLHF-V preference pairs (question, chosen, rejected, image)",
    }
    for name, help_text in formats.items():
        p = fmt.add_parser(name, help=help_text)
        if name == "hf":
            p.add_argument("--data", required=True, help="a save_to_disk directory, or parquet/arrow files (a file or a directory)")
            p.add_argument("--messages-column", help="default: messages or conversations")
            p.add_argument("--images-column", help="default: images or image")
            p.add_argument("--videos-column", help="default: videos or video")
            p.add_argument("--split", help="for a DatasetDict (default: train, else the first)")
        else:
            p.add_argument("--json", required=True, help=".json (a list, streamed) or .jsonl (one record per line)"
                           if name != "internvl" else "the meta JSON")
        if name != "internvl":  # the meta file names each annotation's root
            p.add_argument("--media-root", "--image-root", dest="media_root",
                           help="directory that relative image/video paths are resolved against")
        p.add_argument("--out", required=True)
        p.add_argument("--shard-size", type=int, default=1000)
        p.add_argument("--workers", type=int, default=1, help="processes converting records (order is kept)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the conversion finished")
        p.add_argument("--video-frames", type=int, default=8, help="video files: frames sampled uniformly")
        p.add_argument("--video-fps", type=float, help="video files: sample at this rate instead of --video-frames")
        p.set_defaults(func=_data_convert)
    yes_no = fmt.add_parser("yes-no-pairs", help="pairs from yes/no answers in conversation shards (chosen = the answer)")
    yes_no.add_argument("--shards", required=True, help="a directory (or .tar) of conversation shards")
    yes_no.add_argument("--out", required=True)
    yes_no.set_defaults(func=_yes_no_pairs)

    index = data.add_parser("index", help="build (or check) the persistent shard index of shard directories")
    index.add_argument("dirs", nargs="+", help="directories (or .tar files) of shards")
    index.add_argument("--workers", type=int, help="parallel indexing processes (default: all CPUs)")
    index.set_defaults(func=_data_index)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    init = model.add_parser("init", help="export an untrained preset model in HF format")
    init.add_argument("--preset", default="demo", choices=["tiny", "demo"])
    init.add_argument("--spec", help="instead of a preset: a published InternVL shape from vlmscale/model/specs.py "
                                     "(e.g. internvl2-1b), random weights, the demo tokenizer")
    init.add_argument("--shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=1234)
    init.add_argument("--max-tiles", type=int, default=None, help="max_patches of the image processor (default: presets 4, a --spec 12)")
    init.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES, help="storage dtype of the weights")
    init.set_defaults(func=_model_init)
    convert = model.add_parser("convert", help="InternVL's original format (InternVLChatModel) to / from HF",
                               description="Import an original-format InternVL release (config.json + safetensors; "
                                           "no remote code is run) to the HF layout, or export an HF-format model "
                                           "to the original layout. See docs/checkpoints.md.")
    convert.add_argument("src", help="the checkpoint directory to convert")
    convert.add_argument("--from", dest="from_format", choices=["internvl-chat"], help="import SRC from this format")
    convert.add_argument("--to", dest="to_format", choices=["internvl-chat"], help="export SRC (HF) to this format")
    convert.add_argument("--out", required=True, help="a new directory")
    convert.add_argument("--llm", choices=["qwen2", "llama", "internlm2"],
                         help="export: the original LLM class (default: what the model was imported from, else by its text config)")
    convert.add_argument("--shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    convert.set_defaults(func=_model_convert)

    ev = sub.add_parser("eval", help="score a model on held-out data, or compare two results")
    ev.add_argument("suite", help="vqa, grounding, pope, text, drift (comma-separated), or 'compare A.json B.json'")
    ev.add_argument("files", nargs="*", help="with 'compare': the two result files")
    ev.add_argument("--model", help="an HF-format export, e.g. <output_dir>/hf")
    ev.add_argument("--data", help="held-out directory holding <suite>/ shard folders (e.g. data/demo/heldout)")
    ev.add_argument("--reference", help="drift: the model whose vision encoder is the reference")
    ev.add_argument("--out", help="write results JSON here")
    ev.add_argument("--max-samples", type=int, default=0)
    ev.add_argument("--max-new-tokens", type=int, default=24)
    ev.add_argument("--deepspeed", default="ds_configs/zero3.json",
                    help="under a launcher with several ranks: the ZeRO-3 JSON the model is partitioned with")
    ev.add_argument("--vcd", action="store_true", help="visual contrastive decoding for generative suites")
    ev.add_argument("--vcd-alpha", type=float, default=1.0)
    ev.add_argument("--vcd-beta", type=float, default=0.1)
    ev.add_argument("--gather-policy-max-bytes", default="2GB",
                    help="gather the whole model once per generation call when it is at most this size (0: per layer)")
    ev.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                         help=DTYPE_HELP)
    ev.set_defaults(func=_eval_dispatch)

    ewc = sub.add_parser("ewc", help="elastic weight consolidation").add_subparsers(dest="ewc_command", required=True)
    fisher = ewc.add_parser("fisher", help="estimate the diagonal Fisher and save it with the anchor weights",
                            description="Empirical diagonal Fisher (mean squared per-sample log-likelihood gradient) "
                                        "of --model on --data, written with the anchor weights to --out for "
                                        "regularizer.ewc.path. Runs under ZeRO-3 on any number of ranks.")
    fisher.add_argument("--model", required=True, help="an HF-format export, e.g. <output_dir>/hf")
    fisher.add_argument("--data", required=True, help="a directory (or .tar) of shards of the task to protect")
    fisher.add_argument("--out", required=True, help="new directory for ewc.json + ewc-*.safetensors")
    fisher.add_argument("--samples", type=int, default=512, help="samples in the estimate (a seeded subset)")
    fisher.add_argument("--params", default="llm", choices=["llm", "vision", "both"], help="which parameters to protect")
    fisher.add_argument("--seed", type=int, default=0)
    fisher.add_argument("--max-seq-len", type=int, default=4096, help="longer samples are skipped")
    fisher.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                         help=DTYPE_HELP)
    fisher.add_argument("--deepspeed", default="ds_configs/zero3.json", help="a ZeRO-3 DeepSpeed JSON")
    fisher.set_defaults(func=_ewc_fisher)

    ckpt = sub.add_parser("ckpt", help="checkpoint utilities").add_subparsers(dest="ckpt_command", required=True)
    conv = ckpt.add_parser("convert", help="convert a checkpoint to DeepSpeed's universal format (offline)",
                           description="Run before relaunching a run on a different number of ranks: the resume then "
                                       "loads <tag>/universal, each rank reading only its own partition. Large "
                                       "checkpoints must be converted this way (see docs/cluster.md).")
    conv.add_argument("run_dir", help="the run's output_dir (holding checkpoints/)")
    conv.add_argument("--to", required=True, choices=["universal"])
    conv.add_argument("--tag", help="the checkpoint (default: the newest committed one)")
    conv.add_argument("--workers", type=int, default=4, help="processes extracting and merging parameters")
    conv.set_defaults(func=_ckpt_convert)

    plan = sub.add_parser("plan", help="per-GPU memory of a training run, and the settings that fit (no GPU needed)",
                          description="Per-GPU memory for parameters, gradients, optimizer states and activations of "
                                      "a run on a cluster, before queueing it; see docs/plan.md. The model, policy, "
                                      "sequence length, micro-batch, checkpointing and DeepSpeed JSON come from the run "
                                      "config (--stage, --config, key=value overrides).")
    plan.add_argument("overrides", nargs="*", help="run-config overrides, e.g. data.max_seq_len=4096 policy.vision.trainable=true")
    plan.add_argument("--model", help="a preset (tiny, demo), a named size (internvl2-26b, internvl2.5-8b, ...) or a "
                                      "directory with an HF config.json; compositions: model.vision=... model.llm=...")
    plan.add_argument("--stage", default="sft", choices=["sft", "align", "pretrain"], help="whose default policy applies")
    plan.add_argument("--config", help="a run-config YAML (as passed to the recipes)")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (A100-40G: 40)")
    plan.add_argument("--reserve", type=float, default=2.0, help="GiB per GPU kept free (CUDA context, NCCL, fragmentation)")
    plan.add_argument("--zero", type=int, choices=[1, 2, 3], help="override the DeepSpeed JSON's ZeRO stage")
    plan.add_argument("--offload", choices=["none", "optimizer", "all"], help="override the JSON's offload (all = optimizer + params)")
    plan.add_argument("--tiles", type=int, help="image tiles per sample (default: data.max_tiles + 1 thumbnail, within max_seq_len)")
    plan.add_argument("--max-micro-batch", type=int, default=64, help="largest micro-batch the search tries")
    plan.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the run executes (AdamW temporaries)")
    plan.add_argument("--json", help="also write the figures here")
    plan.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``vlmscale`` command and ``python -m vlmscale.cli``: :func:`main`, then the process ends as a
    recipe's does (``vlmscale.process.exit_process``: exit handlers, flush, no module teardown), since
    ``eval`` and ``fisher`` run as ranks of a process group."""
    from vlmscale.process import exit_process

    code = main()
    exit_process(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    entry()
