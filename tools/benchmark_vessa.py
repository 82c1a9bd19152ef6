"""Benchmark VESSA (Stage 1) against a supervised UNet on the same labelled ACDC cases, and check its real-scale size.

Benchmark mode trains the ``vessa_foundation`` bundle for ``max_iterations`` on the labelled cases of ``dataset_dir``
(the template bank is built from those cases), then reports VESSA-alone Dice per class on the ``val.list`` volumes,
against the ``vessa_ssl_acdc`` bundle with ``method=supervised`` (the UNet) trained for the same iterations and batch
size; plus VESSA's pseudo-labelling throughput (slices/s, all classes of a slice per forward) and the peak memory of
each run. Each run happens in a fresh process so peak memory is its own::

    python tools/benchmark_vessa.py --dataset_dir ../shared/data/acdc_ssl4mis --labeled_cases 3 \\
        --max_iterations 600 --out_dir runs/benchmark_vessa

Size-check mode builds the real-scale architectures with random weights: Qwen3-VL-2B (on the meta device for its
parameter count, then on the CPU for one forward when memory allows) and SAM2.1-tiny at 1024 pixels. It reports
parameter counts, FLOPs per sample (counted with ``torch.utils.flop_counter`` for SAM2, estimated for the VLM from its
sizes and token counts) and CPU forward times::

    python tools/benchmark_vessa.py --size_check --out_dir runs/vessa_size

Both modes print a markdown table and write ``results.json`` / ``results.md`` (or ``size_check.*``) to ``out_dir``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from pathlib import Path
from typing import Any

import fire
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "vessa_foundation"
CLASSES = ("right_ventricle", "myocardium", "left_ventricle")


def _peak_rss_gb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024**2


def _in_process(target, *args) -> dict[str, Any]:
    """Run ``target(*args, queue)`` in a spawned process and return what it puts in the queue."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode != 0 or "error" in result:
        raise RuntimeError(f"{target.__name__} failed: {result.get('error', process.exitcode)}")
    return result


# ----------------------------------------------------------------------------------------------------- benchmark


def _train_vessa(output_dir: str, overrides: dict[str, Any], threads: int, throughput_slices: int, queue) -> None:
    try:
        import json

        from ignite.engine import Events
        from monai.bundle import ConfigWorkflow
        from monai.transforms import Compose, EnsureChannelFirstd, Resized

        from vessa_components.data import LoadH5d
        from vessa_components.networks import VessaSegmenter

        torch.set_num_threads(threads)
        workflow = ConfigWorkflow(
            config_file=str(BUNDLE / "configs" / "train.json"), workflow_type="train", bundle_root=str(BUNDLE),
            output_dir=output_dir, **overrides,
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        stamps: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
        start = time.perf_counter()
        workflow.run()
        wall = time.perf_counter() - start
        # val_interval = max_iterations: the one validation round is VESSA's final evaluation on val.list
        report = json.loads((Path(output_dir) / "validation" / "metrics.json").read_text())

        network = workflow.parser.get_parsed_content("vessa")
        segmenter = VessaSegmenter(network, workflow.parser.get_parsed_content("bank")).eval()
        size = int(workflow.parser.get_parsed_content("image_size"))
        batch_size = int(workflow.parser.get_parsed_content("batch_size"))
        from vessa_components.data import make_slice_datalist

        datalist = make_slice_datalist(
            workflow.parser.get_parsed_content("slice_dir"), workflow.parser.get_parsed_content("labeled_cases")
        )
        load = Compose([LoadH5d("image"), EnsureChannelFirstd("image", channel_dim="no_channel"),
                        Resized("image", (size, size))])
        entries = (datalist["unlabeled"] or datalist["labeled"])[:throughput_slices]
        images = torch.stack([torch.as_tensor(load(dict(e))["image"]).float() for e in entries])
        device = next(network.parameters()).device
        with torch.no_grad():
            segmenter(images[:1].to(device))  # warm-up (and re-embedding of a stale bank)
            begin = time.perf_counter()
            for i in range(0, len(images), batch_size):
                segmenter(images[i : i + batch_size].to(device)).max(dim=1)
            elapsed = time.perf_counter() - begin
        queue.put(
            {
                "iterations": trainer.state.iteration,
                "wall_s": wall,
                "median_iteration_s": sorted(b - a for a, b in zip(stamps, stamps[1:]))[len(stamps) // 2 - 1]
                if len(stamps) > 1 else float("nan"),
                "summary": report["summary"],
                "pseudo_label_slices": len(images),
                "pseudo_label_slices_per_s": len(images) / elapsed,
                "peak_rss_gb": _peak_rss_gb(),
                "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None,
            }
        )
    except Exception as e:  # reported to the parent, which raises
        queue.put({"error": repr(e)})
        raise


def _dice(summary: dict[str, Any], name: str) -> float:
    return float(summary[name]["dice"]["mean"]) if name in summary else float("nan")


def format_benchmark(results: dict[str, Any]) -> str:
    rows = ["| method | " + " | ".join(f"Dice {c}" for c in CLASSES) + " | mean Dice | iterations | wall (s) | peak RSS (GB) |",
            "|---|" + "---:|" * (len(CLASSES) + 4)]
    for name, run in results["runs"].items():
        summary = run["summary"]
        cells = [f"{100 * _dice(summary, c):.1f}" for c in CLASSES] + [f"{100 * _dice(summary, 'mean'):.1f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {run['iterations']} | {run['wall_s']:.0f} | {run['peak_rss_gb']:.2f} |")
    vessa = results["runs"].get("vessa")
    if vessa:
        rows.append("")
        rows.append(f"VESSA pseudo-labelling: {vessa['pseudo_label_slices_per_s']:.2f} slices/s over "
                    f"{vessa['pseudo_label_slices']} slices (all {len(CLASSES)} classes per slice, template matching included).")
    settings = results["settings"]
    rows.append(f"Settings: {settings}. Dice in %, mean over the val.list volumes (per-volume 3D Dice).")
    return "\n".join(rows) + "\n"


def benchmark(
    dataset_dir: str,
    labeled_cases: str | int = 3,
    max_iterations: int = 600,
    out_dir: str = "runs/benchmark_vessa",
    data_layout: str = "ssl4mis",
    image_size: int = 128,
    batch_size: int = 4,
    learning_rate: float = 3e-4,
    train_vlm: str = "frozen",
    seed: int = 0,
    threads: int = 2,
    num_workers: int = 1,
    throughput_slices: int = 64,
    unet: bool = True,
) -> dict[str, Any]:
    """Train VESSA and the supervised UNet with the same budget; see the module docstring."""
    from vessa_components.reporting.benchmark import run_method
    from vessa_components.utils import write_json, write_text

    out = Path(out_dir)
    common = {"dataset_dir": dataset_dir, "data_layout": data_layout, "labeled_cases": labeled_cases,
              "max_iterations": max_iterations, "val_interval": max_iterations, "save_interval": max_iterations,
              "batch_size": batch_size, "num_workers": num_workers, "seed": seed, "show_progress": False}
    results: dict[str, Any] = {"settings": {**common, "image_size": image_size, "train_vlm": train_vlm}, "runs": {}}
    vessa_overrides = {**common, "image_size": image_size, "learning_rate": learning_rate, "train_vlm": train_vlm}
    results["runs"]["vessa"] = _in_process(_train_vessa, str(out / "vessa"), vessa_overrides, threads, throughput_slices)
    write_json(out / "results.json", results)  # partial results survive a crash of the next run
    if unet:
        results["runs"]["unet_supervised"] = run_method(
            out / "unet_supervised", threads=threads, method="supervised", roi_size=image_size, **common
        )
    write_json(out / "results.json", results)
    table = format_benchmark(results)
    write_text(out / "results.md", table)
    print(table)
    return results


# ---------------------------------------------------------------------------------------------------- size check


def _vlm_flops(config, image_side: int = 256, text_tokens: int = 64) -> dict[str, float]:
    """Forward FLOPs (multiply-add = 2) of Qwen3-VL on one VESSA sample: two images of ``image_side`` pixels (the
    image processor's minimum budget of 65536 pixels for 128-pixel slices) and ``text_tokens`` of text and answer."""
    vision, text = config.vision_config, config.text_config
    patches = (image_side // vision.patch_size) ** 2  # per image
    merged = patches // vision.spatial_merge_size**2
    tokens = 2 * merged + text_tokens
    v_hidden, v_ffn = vision.hidden_size, vision.intermediate_size
    vision_layer = 2 * patches * (4 * v_hidden * v_hidden + 2 * v_hidden * v_ffn) + 4 * patches * patches * v_hidden
    vision_flops = 2 * vision.depth * vision_layer
    h, ffn, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    text_layer = 2 * tokens * (h * q + 2 * h * kv + q * h + 3 * h * ffn) + 4 * tokens * tokens * q
    answer_logits = 2 * 4 * h * text.vocab_size  # lm_head on the few answer positions only
    return {"tokens": tokens, "vision_patches": 2 * patches, "gflops": (vision_flops + layers * text_layer + answer_logits) / 1e9}


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info.get("MemAvailable", 0) / 1024**2


def _vlm_forward(text_tokens: int, queue) -> None:
    try:
        from transformers import Qwen3VLForConditionalGeneration

        from vessa_components.networks import qwen3vl_2b_config

        config = qwen3vl_2b_config()
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration(config)
        model = model.to_empty(device="cpu").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
            for name, b in model.named_buffers():  # rotary inverse frequencies: recompute, they are not weights
                if "inv_freq" in name:
                    module = model.get_submodule(name.rsplit(".", 1)[0])
                    if hasattr(module, "rope_init_fn"):
                        inv_freq, _ = module.rope_init_fn(module.config, "cpu")
                        b.copy_(inv_freq)
                    else:
                        dim = b.numel() * 2
                        b.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)))
        vision = config.vision_config
        grid = 256 // vision.patch_size
        merged = grid * grid // vision.spatial_merge_size**2
        image = [config.vision_start_token_id] + [config.image_token_id] * merged + [config.vision_end_token_id]
        ids = torch.tensor([image + image + torch.randint(0, 150000, (text_tokens,)).tolist()])
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == config.image_token_id).int(),
            "pixel_values": torch.randn(2 * grid * grid, 3 * vision.temporal_patch_size * vision.patch_size**2),
            "image_grid_thw": torch.tensor([[1, grid, grid], [1, grid, grid]]),
        }
        with torch.no_grad():
            start = time.perf_counter()
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
            elapsed = time.perf_counter() - start
        queue.put({"forward_s": elapsed, "finite": bool(torch.isfinite(hidden).all()), "peak_rss_gb": _peak_rss_gb()})
    except Exception as e:
        queue.put({"error": repr(e)})
        raise


def size_check(out_dir: str = "runs/vessa_size", threads: int = 2, vlm_forward: bool = True) -> dict[str, Any]:
    """Parameter counts, FLOPs per sample and CPU forward times of Qwen3-VL-2B and SAM2.1-tiny (random weights)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen3VLForConditionalGeneration

    from vessa_components.networks import Sam2Parts, build_sam2_model, count_parameters, qwen3vl_2b_config
    from vessa_components.utils import write_json, write_text

    torch.set_num_threads(threads)
    result: dict[str, Any] = {"device": "cpu", "threads": threads}
    config = qwen3vl_2b_config()
    with torch.device("meta"):
        vlm = Qwen3VLForConditionalGeneration(config)
    result["qwen3vl_2b"] = {
        "parameters": count_parameters(vlm),
        "vision_parameters": count_parameters(vlm.model.visual),
        "language_parameters": count_parameters(vlm.model.language_model),
        **_vlm_flops(config),
        "flops_note": "estimated: 2 x multiply-adds of the linear layers and attention for two 256 x 256 images + 64 text tokens",
    }
    del vlm

    sam2 = build_sam2_model(preset="full")
    # frozen: FlopCounterMode's module tracker cannot hook parameters returned as outputs (SAM2's learned embeddings)
    parts = Sam2Parts(sam2.requires_grad_(False)).eval()
    size = parts.image_size
    images, mask = torch.rand(2, 1, size, size), torch.zeros(1, 1, size, size)
    mask[..., size // 3 : size // 2, size // 3 : size // 2] = 1
    prompt = torch.randn(1, 1, parts.prompt_embed_dim)

    def sam2_sample() -> torch.Tensor:
        encoded = parts.encode_image(images)
        target, template = encoded["image_embedding"].chunk(2)
        high_res = [f.chunk(2)[0] for f in encoded["high_res_features"]]
        memory, memory_pos = parts.encode_memory(template, mask)
        conditioned = parts.condition_on_memory(target, memory, memory_pos)
        return parts.decode_masks(conditioned, high_res, prompt_tokens=prompt)["logits"]

    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            sam2_sample()
        start = time.perf_counter()
        sam2_sample()
        sam2_time = time.perf_counter() - start
    result["sam2.1_hiera_tiny"] = {
        "parameters_full_model": count_parameters(sam2),
        "parameters_used_by_vessa": count_parameters(parts),
        "image_size": size,
        "gflops": counter.get_total_flops() / 1e9,
        "flops_note": "counted by torch.utils.flop_counter: target + template through the encoder, memory, decoder",
        "cpu_forward_s": sam2_time,
    }
    del sam2, parts

    needed = result["qwen3vl_2b"]["parameters"] * 4 / 1024**3 * 1.3
    available = _available_gb()
    if not vlm_forward:
        result["qwen3vl_2b"]["cpu_forward"] = "skipped (--vlm_forward False)"
    elif available < needed:
        result["qwen3vl_2b"]["cpu_forward"] = (
            f"skipped: float32 weights need about {needed:.1f} GB, only {available:.1f} GB of memory is available"
        )
    else:
        forward = _in_process(_vlm_forward, 64)
        result["qwen3vl_2b"]["cpu_forward_s"] = forward["forward_s"]
        result["qwen3vl_2b"]["cpu_forward_peak_rss_gb"] = forward["peak_rss_gb"]
    vlm_info, sam_info = result["qwen3vl_2b"], result["sam2.1_hiera_tiny"]
    lines = [
        "| part | parameters (M) | GFLOPs / sample (forward) | CPU forward (s) |",
        "|---|---:|---:|---:|",
        f"| Qwen3-VL-2B | {vlm_info['parameters'] / 1e6:.1f} (vision {vlm_info['vision_parameters'] / 1e6:.1f}, "
        f"language {vlm_info['language_parameters'] / 1e6:.1f}) | {vlm_info['gflops']:.0f} ({vlm_info['tokens']} tokens) | "
        f"{vlm_info.get('cpu_forward_s', float('nan')):.1f} |",
        f"| SAM2.1-tiny at {sam_info['image_size']} px | {sam_info['parameters_used_by_vessa'] / 1e6:.1f} "
        f"(full model {sam_info['parameters_full_model'] / 1e6:.2f}) | {sam_info['gflops']:.0f} | {sam_info['cpu_forward_s']:.1f} |",
    ]
    if "cpu_forward" in vlm_info:
        lines.append(f"\nQwen3-VL-2B CPU forward: {vlm_info['cpu_forward']}")
    lines.append(f"\n{threads} CPU threads, float32, random weights, no GPU used.")
    table = "\n".join(lines) + "\n"
    out = Path(out_dir)
    write_json(out / "size_check.json", result)
    write_text(out / "size_check.md", table)
    print(table)
    return result


def main(size_check: bool = False, **kwargs: Any) -> None:
    """``--size_check`` for the real-scale size check, otherwise the benchmark (``--dataset_dir`` required)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(kwargs.get("threads", 2)))
    if size_check:
        globals()["size_check"](**kwargs)
    else:
        benchmark(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
