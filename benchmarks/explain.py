"""Cost of mdistiller.explain relative to one forward+backward (cross-entropy) of the same model on the same batch.

For each model, method, layer and K (classes per sample):
- teacher path: eval mode, the forward under no_grad inside `record(model, layer)` (which keeps only what maps at
  that layer read), then the maps without a graph;
- student path: train mode, the recorded forward, the maps with create_graph, and the backward of CE + an MSE on the
  maps (the full derivative, rule normalisers included; with --detach-normalizers the normalisers are constants).
CAM uses `explain_from_features` (no recording). Times are medians over --repeats runs (CPU: process CPU time, so a
busy machine does not inflate them; CUDA: synchronised wall time). Peak memory is measured in a fresh process per
configuration (CPU: peak growth of torch's allocated bytes, from the profiler's memory events; CUDA: peak allocated
growth) and divided by the peak growth of the baseline step, i.e. the step's activation memory.
Prints one JSON document.

    python benchmarks/explain.py --models resnet32x4 resnet8x4 --batch 64 --ks 1 5 30 100
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mdistiller.explain import build_graph, explain_from_features, explain_recorded, record
from mdistiller.explain.engine import forward
from mdistiller.models import cifar_model_dict

METHODS = ["cam@gap", "gradcam@2", "lrp@gap", "lrp@2", "lrp@input"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    _sync(device)
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def _setup(cfg: Dict, device: torch.device):
    torch.manual_seed(0)
    model = cifar_model_dict[cfg["model"]][0](num_classes=100).to(device)
    image = torch.randn(cfg["batch"], 3, 32, 32, device=device)
    target = torch.randint(0, 100, (cfg["batch"],), device=device)
    return model, image, target


def _step(cfg: Dict, model, image, target) -> None:
    """One run of the configuration: the baseline training step, or a teacher / student explanation."""
    method, layer, k = cfg["method"], cfg["layer"], cfg["k"]
    if method == "baseline":
        model.train()
        logits, _ = model(image)
        F.cross_entropy(logits, target).backward()
        model.zero_grad(set_to_none=True)
        return
    student = cfg["path"] == "student"
    model.train(student)
    with torch.set_grad_enabled(student), record(model, layer) if method != "cam" else nullcontext() as tape:
        logits, feats = model(image)
    classes = logits.detach().topk(k, 1).indices
    if method == "cam":
        maps = explain_from_features(model, feats, classes, "cam", create_graph=student)
    else:
        detach = student and method == "lrp" and cfg["detach_normalizers"]
        maps = explain_recorded(tape, classes, method, layer, create_graph=student, recompute=cfg["recompute"],
                                detach_normalizers=detach)
    if student:
        (F.cross_entropy(logits, target) + maps.pow(2).mean()).backward()
        model.zero_grad(set_to_none=True)


def _cpu_peak_bytes(fn) -> int:
    """Peak growth of the bytes held by torch's CPU allocator while fn() runs, read from the profiler's memory
    events: the CPU counterpart of CUDA's max_memory_allocated (RSS would count the C allocator's cached pages)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as trace:
            events = [e["args"] for e in json.load(trace)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def run_one(cfg: Dict, device: torch.device, repeats: int) -> Dict:
    model, image, target = _setup(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(cfg, model, image, target)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        _step(cfg, model, image, target)  # warm: one-off allocations (thread pools, kernels) are not the step's
        peak = _cpu_peak_bytes(lambda: _step(cfg, model, image, target))
    times = []
    for _ in range(repeats):
        start = _clock(device)
        _step(cfg, model, image, target)
        times.append(_clock(device) - start)
    return {"time_s": statistics.median(times), "peak_bytes": peak}


def _layer_numel(model_name: str, layer: str) -> int:
    """Elements per sample of the largest tensor between the classifier and `layer` (relevance or a gradient is
    propagated through each, one per class)."""
    model = cifar_model_dict[model_name][0](num_classes=100).eval()
    image = torch.zeros(1, 3, 32, 32)
    graph = build_graph(model, image.shape)
    with torch.no_grad():
        values = forward(graph, image).values
    keys = graph.keys()
    return max(values[key].numel() for key in keys[keys.index(graph.resolve(layer)):])


def _configs(args) -> List[Dict]:
    """Every configuration, and those skipped because one [B, K, C, H, W] relevance tensor alone would exceed the
    memory limit (each layer below the map's holds one such tensor during the walk; the student path keeps them)."""
    run, skipped = [], []
    recompute = not args.no_recompute
    for model in args.models:
        run.append({"model": model, "batch": args.batch, "method": "baseline", "layer": None, "k": 0, "path": None})
        for method, layer in (m.split("@") for m in args.methods):
            numel = _layer_numel(model, layer)
            for k in args.ks:
                for path in ("teacher", "student"):
                    cfg = {"model": model, "batch": args.batch, "method": method, "layer": layer, "k": k, "path": path,
                           "recompute": recompute, "detach_normalizers": args.detach_normalizers}
                    size_gb = args.batch * k * numel * 4 / 2 ** 30 if method != "cam" else 0.0
                    limit = args.max_teacher_gb if path == "teacher" else args.max_student_gb
                    if size_gb > limit:
                        skipped.append({**cfg, "relevance_tensor_gb": round(size_gb, 2)})
                    else:
                        run.append(cfg)
    return run, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet32x4", "resnet8x4"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 5, 30, 100])
    parser.add_argument("--methods", nargs="+", default=METHODS, help="method@layer")
    parser.add_argument("--max-teacher-gb", type=float, default=1.0,
                        help="skip teacher configurations whose [B, K, C, H, W] relevance tensor exceeds this")
    parser.add_argument("--max-student-gb", type=float, default=0.25,
                        help="the same for the student path, which keeps these tensors for the backward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-recompute", action="store_true",
                        help="student path: keep every intermediate of the walk instead of recomputing it")
    parser.add_argument("--detach-normalizers", action="store_true",
                        help="student path, LRP: the rule normalisers are constants (approximate derivative)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), device, args.repeats)))
        return
    configs, skipped = _configs(args)
    results = []
    for cfg in configs:
        command = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg), "--device", args.device,
                   "--repeats", str(args.repeats)]
        measured = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        results.append({**cfg, **measured})
        print(f"{cfg}: {measured}", file=sys.stderr, flush=True)
    for row in results:
        base = next(r for r in results if r["model"] == row["model"] and r["method"] == "baseline")
        row["time_ratio"] = round(row["time_s"] / base["time_s"], 3)
        row["memory_ratio"] = round(row["peak_bytes"] / max(base["peak_bytes"], 1), 3)
    print(json.dumps({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "timer": "wall (synchronised)" if device.type == "cuda" else "process CPU time",
                      "results": results, "skipped": skipped}, indent=1))


if __name__ == "__main__":
    main()
