"""End-to-end fine-tuning step on a Stable Diffusion 1.5 UNet: peak memory and step time of five ways to fine-tune.

    python benchmarks/e2e_unet.py --json OUT.json          # GPU: sd15 config, 64x64 latents, batch 1 and 4
    python benchmarks/e2e_unet.py --config tiny --json benchmarks/results/cpu-e2e-tiny.json     # CPU, small model
    python benchmarks/e2e_unet.py --resume OUT.json --json OUT2.json   # the runs a stopped measurement did not reach

Variants (``e2e_step.py`` builds them): (a) full-ft, deterministic fine-tune of the paper-dreambooth layers;
(b) paper, the paper's own implementation (``paper_bayes.py``); (c) ours-dreambooth; (c') the same with the prior
means stored in bf16; (d) peft-lora; (e) ours-lora.
Each runs with and without gradient checkpointing at every batch size, in a fresh randomly initialised UNet
(float32 weights, bf16 autocast, AdamW over the trainable parameters), freed before the next one.

What is measured, per run:
* step time: forward + loss (+ KL) + backward + AdamW step, the median of ``--repeats`` steps after ``--warmup``
  (CUDA events on a GPU, perf_counter on CPU);
* GPU memory: ``torch.cuda.max_memory_allocated`` over the timed steps (peak statistics reset after warm-up,
  when AdamW's states exist: the steady state of training);
* on every device, an accounting of one more step: bytes of the model's parameters and buffers, of the frozen
  prior copy (b), of the gradients, of AdamW's states, and of the tensors autograd saves for backward (counted
  with ``torch.autograd.graph.saved_tensors_hooks``, storages of parameters and buffers left out).  On CPU there is
  no peak-allocation counter: the targets are evaluated on the sum of those bytes, labelled as such.

The targets of the end-to-end benchmark (issue text) are evaluated for every (batch size, checkpointing) pair and
printed last, with one more check that is not a target: (c')'s memory against the same bound as (c)'s.
They are stated for the sd15 config on a GPU; on other configs they are evaluated for reference only.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_step import (UNET_CONFIGS, VARIANTS, VariantUnavailable, build_unet, make_batch, setup_variant,  # noqa: E402
                      training_step, forward_loss)
from ratios import compiling_for_this_gpu, environment, write_json  # noqa: E402

GIB = 2**30
MIB = 2**20
B_MINUS_C_MIN_BYTES = 4 * GIB  # "(c) at least 4 GB below (b)": read as 4 GiB, the stricter reading
C_OVER_A_MAX_TIME = 1.15
# torch.optim.AdamW implementations.  "fused" (the GPU default here) updates every tensor in place: the optimizer
# then holds exactly two moments per trainable element, so differences in peak memory between variants are their
# own; "foreach" (torch's default on a GPU) also allocates a temporary as large as all trainable parameters.
ADAMW_IMPLS = {"default": {}, "fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
E_OVER_D_MAX = 1.05


# --------------------------------------------------------------------------------------------------------------
# measuring one run
# --------------------------------------------------------------------------------------------------------------

def _storage_key(tensor: torch.Tensor):
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return None


def _unique_bytes(tensors) -> int:
    keys = {_storage_key(t) for t in tensors if t is not None and t.device.type != "meta"}
    return sum(key[1] for key in keys if key is not None)


def _state_tensors(optimizer: torch.optim.Optimizer) -> list:
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


def account_step(unet, batch, optimizer, setup, *, kl_weight: float) -> dict:
    """One more training step, instrumented: the bytes held by the model, its gradients, AdamW's states and the
    tensors autograd saves for backward (new storages only: parameters and buffers are counted once, as model)."""
    model_storages = {_storage_key(t) for t in [*unet.parameters(), *unet.buffers()]}
    saved = {"forward": {}, "kl": {}}  # phase -> {storage pointer: bytes}
    phase = ["forward"]

    def pack(tensor):
        key = _storage_key(tensor)
        if key is not None and key not in model_storages and all(key[0] not in s for s in saved.values()):
            saved[phase[0]][key[0]] = key[1]
        return tensor

    def kl_phase():  # what the KL computation saves, counted apart
        phase[0] = "kl"
        return setup.kl()

    marked = dataclasses.replace(setup, kl=kl_phase if setup.kl is not None else None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, kl = forward_loss(unet, batch, marked, kl_weight=kl_weight)
    loss.backward()
    grad_bytes = _unique_bytes(p.grad for p in setup.trainable)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    figures = {
        "model_bytes": _unique_bytes([*unet.parameters(), *unet.buffers()]),
        "trainable_param_bytes": _unique_bytes(setup.trainable),
        "frozen_copy_bytes": setup.info.get("frozen_copy_bytes", 0),
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": _unique_bytes(t for t in _state_tensors(optimizer) if t.dim() > 0),
        "saved_tensor_bytes": sum(sum(part.values()) for part in saved.values()),
        "saved_by_kl_bytes": sum(saved["kl"].values()),
    }
    figures["total_bytes"] = (figures["model_bytes"] + figures["frozen_copy_bytes"] + figures["grad_bytes"]
                              + figures["optimizer_state_bytes"] + figures["saved_tensor_bytes"])
    return figures


def _timed_step(step, device: torch.device):
    """(seconds, what ``step()`` returned): CUDA events around the step on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, result
    begin = time.perf_counter()
    result = step()
    return time.perf_counter() - begin, result


def release(device: torch.device) -> None:
    """Free what the last run left: Python garbage, then the CUDA caching allocator's blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def warm_up_libraries(device: torch.device, adamw: str) -> None:
    """One throwaway bfloat16-autocast forward and backward of a linear and a conv and one AdamW step: the cuBLAS
    workspaces that torch allocates once per handle (forward's thread and autograd's backward thread) and keeps are
    then in every run's ``allocated_before_bytes``, not only in the first run's peak (which would overstate the
    first variant by that much against the others).  main calls it on a GPU only."""
    linear, conv = torch.nn.Linear(64, 64).to(device), torch.nn.Conv2d(8, 8, 3, padding=1).to(device)
    optimizer = torch.optim.AdamW([*linear.parameters(), *conv.parameters()], **ADAMW_IMPLS[adamw])
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = linear(torch.randn(16, 64, device=device)).float().sum()
        loss = loss + conv(torch.randn(2, 8, 16, 16, device=device)).float().sum()
    loss.backward()
    optimizer.step()
    del linear, conv, optimizer, loss
    release(device)


def measure(variant: str, *, config: str, batch_size: int, checkpointing: bool, device: torch.device,
            repeats: int, warmup: int, kl_weight: float, lr: float, adamw: str = "default", latent_size=None) -> dict:
    """Build a fresh UNet, prepare it for ``variant``, time ``repeats`` steps after ``warmup`` and account one."""
    on_gpu = device.type == "cuda"
    figures = {"allocated_before_bytes": torch.cuda.memory_allocated(device) if on_gpu else None}
    torch.manual_seed(0)
    unet = build_unet(config, device)
    setup = setup_variant(variant, unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(setup.trainable, lr=lr, **ADAMW_IMPLS[adamw])
    batch = make_batch(config, batch_size, device, seed=1, latent_size=latent_size)

    def step():
        return training_step(unet, batch, optimizer, setup, kl_weight=kl_weight)

    for _ in range(warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        elapsed, (loss, kl) = _timed_step(step, device)
        seconds.append(elapsed)
    figures["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device) if on_gpu else None
    # net of what was allocated before this run began (cuBLAS workspaces and whatever an earlier run left behind)
    figures["peak_net_bytes"] = figures["peak_allocated_bytes"] - figures["allocated_before_bytes"] if on_gpu else None
    figures["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device) if on_gpu else None
    figures.update(loss=float(loss), kl=None if kl is None else float(kl))
    figures["accounted"] = account_step(unet, batch, optimizer, setup, kl_weight=kl_weight)
    figures.update(step_seconds={"median": statistics.median(seconds), "min": min(seconds),
                                 "mean": statistics.fmean(seconds), "all": seconds}, **setup.info)
    if not all(math.isfinite(v) for v in (figures["loss"], figures["kl"] if kl is not None else 0.0)):
        raise FloatingPointError(f"loss {figures['loss']} or KL {figures['kl']} is not finite")
    return figures


OURS = ("ours-dreambooth", "ours-dreambooth-bf16prior", "ours-lora")  # the variants that launch bnn_kernels


def compile_variants(args, device: torch.device) -> dict:
    """--compile-only: one forward and backward of each selected variant of ours inside
    ``ratios.compiling_for_this_gpu`` (every autotune config of every kernel compiled, nothing launched), at the
    smallest batch size: the layers' shapes specialise alike at every batch size and with or
    without checkpointing, so the measured runs that follow find their kernels in Triton's cache.  Returns
    {variant: kernel compiles}."""
    compiled, begin = {}, time.perf_counter()
    for variant in [v for v in args.variants if v in OURS]:
        torch.manual_seed(0)
        unet = build_unet(args.config, device)
        setup = setup_variant(variant, unet)
        batch = make_batch(args.config, min(args.batch_sizes), device, seed=1, latent_size=args.latent_size)
        launches = []
        try:
            with compiling_for_this_gpu(device) as launches:
                loss, _ = forward_loss(unet, batch, setup, kl_weight=args.kl_weight)
                loss.backward()
        except Exception:  # noqa: BLE001 - the measured run reports it
            traceback.print_exc()
        compiled[variant] = len(launches)
        print(f"{variant}: {len(launches)} kernel compiles ({time.perf_counter() - begin:.0f} s so far)")
        del unet, setup, batch
        release(device)
    return compiled


def run_one(variant: str, **options) -> dict:
    """``measure`` with the outcome recorded: status "ok", "unavailable" (the variant cannot run with the installed
    code), "oom" or "error"; memory is released whatever happened."""
    device = options["device"]
    letter, label, _ = VARIANTS[variant]
    record = {"variant": variant, "letter": letter, "label": label, "batch_size": options["batch_size"],
              "gradient_checkpointing": options["checkpointing"]}
    try:
        record.update(measure(variant, **options))
        record["status"] = "ok"
    except VariantUnavailable as error:
        record.update(status="unavailable", reason=str(error))
    except torch.cuda.OutOfMemoryError as error:
        record.update(status="oom", reason=str(error).splitlines()[0])
    except Exception as error:  # recorded and reported: one failing variant must not hide the others' figures
        record.update(status="error", reason=f"{type(error).__name__}: {error}")
        traceback.print_exc()
    release(device)
    return record


# --------------------------------------------------------------------------------------------------------------
# targets and report
# --------------------------------------------------------------------------------------------------------------

def memory_of(record: dict, on_gpu: bool) -> float:
    return record["peak_net_bytes"] if on_gpu else record["accounted"]["total_bytes"]


def evaluate_targets(runs: list, on_gpu: bool) -> list:
    """The end-to-end targets for every (batch size, checkpointing) pair: "met", "missed" or "not evaluated"."""
    targets = []
    pairs = sorted({(r["batch_size"], r["gradient_checkpointing"]) for r in runs})
    for batch_size, checkpointing in pairs:
        by = {r["variant"]: r for r in runs
              if (r["batch_size"], r["gradient_checkpointing"]) == (batch_size, checkpointing)}

        def add(name, needs, statement, check, issue_target=True):
            entry = {"target": name, "batch_size": batch_size, "gradient_checkpointing": checkpointing,
                     "statement": statement, "issue_target": issue_target}
            missing = [v for v in needs if by.get(v, {}).get("status") != "ok"]
            if missing:
                reasons = ", ".join(f"({VARIANTS[v][0]}) {by[v]['status'] if v in by else 'not run'}"
                                    for v in missing)
                entry.update(status=f"not evaluated: {reasons}")
            else:
                met, figures = check(*(by[v] for v in needs))
                entry.update(status="met" if met else "missed", **figures)
            targets.append(entry)

        def c_memory_vs_a(a, c):
            allowance = c["inherent_sigma_bytes"]
            limit = memory_of(a, on_gpu) + allowance
            with_prior = limit + c["prior_mean_bytes"]
            return memory_of(c, on_gpu) <= limit, {
                "c_bytes": memory_of(c, on_gpu), "a_bytes": memory_of(a, on_gpu), "allowance_bytes": allowance,
                "limit_bytes": limit, "prior_mean_bytes": c["prior_mean_bytes"],
                "met_counting_prior_means": memory_of(c, on_gpu) <= with_prior}

        def c_memory_vs_b(b, c):
            gap = memory_of(b, on_gpu) - memory_of(c, on_gpu)
            return gap >= B_MINUS_C_MIN_BYTES, {"b_bytes": memory_of(b, on_gpu), "c_bytes": memory_of(c, on_gpu),
                                                "gap_bytes": gap}

        def c_time_vs_a(a, c):
            ratio = c["step_seconds"]["median"] / a["step_seconds"]["median"]
            return ratio <= C_OVER_A_MAX_TIME, {"ratio": ratio}

        def e_time_vs_d(d, e):
            ratio = e["step_seconds"]["median"] / d["step_seconds"]["median"]
            return ratio <= E_OVER_D_MAX, {"ratio": ratio}

        def e_memory_vs_d(d, e):
            ratio = memory_of(e, on_gpu) / memory_of(d, on_gpu)
            return ratio <= E_OVER_D_MAX, {"ratio": ratio}

        add("c-memory-vs-a", ("full-ft", "ours-dreambooth"),
            "(c) memory <= (a) + sigma's parameters, gradients and AdamW states", c_memory_vs_a)
        add("c'-memory-vs-a", ("full-ft", "ours-dreambooth-bf16prior"),
            "(c') bf16 prior: memory <= (a) + sigma's parameters, gradients, AdamW states", c_memory_vs_a,
            issue_target=False)
        add("c-memory-vs-b", ("paper", "ours-dreambooth"), "(c) memory >= 4 GiB below (b)", c_memory_vs_b)
        add("c-time-vs-a", ("full-ft", "ours-dreambooth"), "(c) step time <= 1.15 x (a)", c_time_vs_a)
        add("e-time-vs-d", ("peft-lora", "ours-lora"), "(e) step time <= 1.05 x (d)", e_time_vs_d)
        add("e-memory-vs-d", ("peft-lora", "ours-lora"), "(e) memory <= 1.05 x (d)", e_memory_vs_d)
    return targets


def print_report(results: dict) -> None:
    on_gpu = results["on_gpu"]
    env = results["environment"]
    print(f"\n# e2e UNet step, config {results['config']} (latents {results['latent_size']}x{results['latent_size']}),"
          f" {env['device']}, torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}")
    print(f"# memory = {results['memory_metric']}")
    print(f"{'batch':>5} {'ckpt':>4}  {'variant':<31} {'status':<11} {'step ms':>9} {'memory MiB':>11} "
          f"{'saved MiB':>10} {'trainable M':>12}")
    for r in results["runs"]:
        name = f"({r['letter']}) {r['variant']}"
        head = f"{r['batch_size']:>5} {'on' if r['gradient_checkpointing'] else 'off':>4}  {name:<31} {r['status']:<11}"
        if r["status"] != "ok":
            print(f"{head} {r.get('reason', '')[:110]}")
            continue
        print(f"{head} {1e3 * r['step_seconds']['median']:9.2f} {memory_of(r, on_gpu) / MIB:11.1f} "
              f"{r['accounted']['saved_tensor_bytes'] / MIB:10.1f} {r['trainable_params'] / 1e6:12.3f}")
    print(f"\n# targets ({results['targets_note']})")
    for t in results["targets"]:
        figures = ""
        if "ratio" in t:
            figures = f"ratio {t['ratio']:.3f}"
        elif "gap_bytes" in t:
            figures = f"gap {t['gap_bytes'] / GIB:.3f} GiB"
        elif "limit_bytes" in t:
            figures = (f"{t['c_bytes'] / MIB:.1f} MiB vs limit {t['limit_bytes'] / MIB:.1f} MiB "
                       f"[(a) {t['a_bytes'] / MIB:.1f} + sigma {t['allowance_bytes'] / MIB:.1f}]; counting the "
                       f"prior means ({t['prior_mean_bytes'] / MIB:.1f} MiB) too: "
                       f"{'met' if t['met_counting_prior_means'] else 'missed'}")
        print(f"batch {t['batch_size']} ckpt {'on ' if t['gradient_checkpointing'] else 'off'} "
              f"{t['statement']:<68} {t['status']:<8} {figures}")


# --------------------------------------------------------------------------------------------------------------
# resuming a cut-short measurement
# --------------------------------------------------------------------------------------------------------------

# What must match for runs of an earlier file to sit in one table with new ones.
RESUME_SETTINGS = ("config", "unet_config", "latent_size", "precision", "optimizer", "kl_weight", "repeats", "warmup",
                   "on_gpu")
RESUME_ENVIRONMENT = ("device", "torch", "triton", "diffusers", "peft")
KEPT_STATUSES = ("ok", "oom", "unavailable")  # outcomes of the measurement itself; "error" runs are run again


def resumed_runs(path: str, results: dict) -> list:
    """The runs of an earlier ``--json`` file to keep (all but errors), after checking it was measured the same
    way on the same machine and software as ``results`` will be; ValueError naming what differs."""
    try:
        with open(path) as handle:
            earlier = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume {path}: cannot read it ({error})") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("runs"), list):
        raise ValueError(f"--resume {path}: not a JSON file written by e2e_unet.py --json")
    here = json.loads(json.dumps(results))  # compared as JSON holds them (tuples read back as lists)
    differs = [key for key in RESUME_SETTINGS if earlier.get(key) != here[key]]
    differs += [f"environment.{key}" for key in RESUME_ENVIRONMENT
                if earlier.get("environment", {}).get(key) != here["environment"].get(key)]
    if differs:
        shown = ", ".join(f"{key} ({_field(earlier, key)!r} there, {_field(here, key)!r} here)" for key in differs)
        raise ValueError(f"--resume {path}: measured differently: {shown}")
    return [run for run in earlier["runs"] if run.get("status") in KEPT_STATUSES]


def _field(results: dict, key: str):
    if key.startswith("environment."):
        return results.get("environment", {}).get(key.split(".", 1)[1])
    return results.get(key)


def run_key(run: dict) -> tuple:
    return run["variant"], run["batch_size"], run["gradient_checkpointing"]


# --------------------------------------------------------------------------------------------------------------

def _versions() -> dict:
    versions = {}
    for name in ("diffusers", "peft", "accelerate", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--config", choices=sorted(UNET_CONFIGS), default="sd15" if on_gpu else "tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--checkpointing", choices=["both", "off", "on"], default="both",
                        help="gradient checkpointing: run each variant without and with it (both), or one")
    parser.add_argument("--repeats", type=int, default=10 if on_gpu else 5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3 if on_gpu else 2, help="untimed steps first")
    parser.add_argument("--latent-size", type=int, default=None, help="latent side (default: the config's)")
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the KL term of (b), (c), (e)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--adamw", choices=list(ADAMW_IMPLS), default="fused" if on_gpu else "default",
                        help="AdamW implementation (default: fused on a GPU, torch's default on CPU)")
    parser.add_argument("--threads", type=int, default=None if on_gpu else 1,
                        help="CPU threads for torch (default on CPU: 1; on a CPU shared with other work, OpenMP "
                             "threads that wait for each other made steps up to 30x slower and erratic)")
    parser.add_argument("--json", default=None, help="write every figure here as JSON")
    parser.add_argument("--resume", default=None, metavar="JSON",
                        help="keep the runs of an earlier --json file (measured the same way on the same machine) "
                             "and run only the others of this selection; runs that ended in an error run again")
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile every Triton kernel (every autotune config) the selected variants of "
                             "ours launch, into Triton's cache, and measure nothing: run beside other work first")
    args = parser.parse_args(argv)
    for name in ("repeats", "latent_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0 or min(args.batch_sizes) < 1:
        parser.error("--warmup must be >= 0 and --batch-sizes >= 1")

    from tqdm import tqdm
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if on_gpu else "cpu")
    if args.compile_only:
        return {"compiled": compile_variants(args, device), "failed": []}
    env = environment(device)
    env.update(_versions(), cuda=torch.version.cuda)
    if on_gpu:
        env["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.checkpointing]
    plan = [(b, ckpt, v) for b in args.batch_sizes for ckpt in modes for v in args.variants]
    # the issue's variants first, (c') after them: a run stopped at a time limit loses the supplement, not a target
    plan.sort(key=lambda run: run[2] == "ours-dreambooth-bf16prior")
    latent = args.latent_size or UNET_CONFIGS[args.config]["sample_size"]
    results = {
        "environment": env, "config": args.config, "unet_config": UNET_CONFIGS[args.config], "latent_size": latent,
        "precision": "float32 weights, bfloat16 autocast",
        "optimizer": f"torch.optim.AdamW(lr={args.lr}, {args.adamw})",
        "kl_weight": args.kl_weight, "repeats": args.repeats, "warmup": args.warmup, "on_gpu": on_gpu,
        "memory_metric": ("peak torch.cuda.max_memory_allocated over the timed steps" if on_gpu else
                          "CPU: bytes of model parameters/buffers + frozen copy + gradients + AdamW states + "
                          "autograd saved tensors (no peak-allocation counter on CPU; transient buffers not counted)"),
        "targets_note": ("stated for the sd15 config on a GPU" if on_gpu and args.config == "sd15" else
                         f"stated for sd15 on a GPU; evaluated here on {args.config} / {device.type} "
                         "for reference only"),
        "runs": [],
    }
    if not on_gpu:
        results["environment"]["note"] = "CPU shared with other processes: timings are indicative"
    if args.resume:
        try:
            results["runs"] = resumed_runs(args.resume, results)
        except ValueError as error:
            parser.error(str(error))
        done = {run_key(run) for run in results["runs"]}
        plan = [(b, ckpt, v) for b, ckpt, v in plan if (v, b, ckpt) not in done]
        results["resumed_from"] = {"path": args.resume, "runs_kept": len(results["runs"])}
        print(f"resuming {args.resume}: {len(results['runs'])} runs kept, {len(plan)} to run")
    if on_gpu:
        warm_up_libraries(device, args.adamw)
    for batch_size, checkpointing, variant in tqdm(plan, desc="e2e runs", unit="run"):
        results["runs"].append(run_one(
            variant, config=args.config, batch_size=batch_size, checkpointing=checkpointing, device=device,
            repeats=args.repeats, warmup=args.warmup, kl_weight=args.kl_weight, lr=args.lr, adamw=args.adamw,
            latent_size=args.latent_size))
        if args.json:  # after every run: a suite stopped by its time limit keeps what it measured
            results["targets"] = evaluate_targets(results["runs"], on_gpu)
            write_json(args.json, results)
    variant_order = list(VARIANTS)  # the table in the order of an uninterrupted run, also after a resume
    results["runs"].sort(key=lambda r: (r["batch_size"], r["gradient_checkpointing"],
                                        variant_order.index(r["variant"])))
    results["targets"] = evaluate_targets(results["runs"], on_gpu)
    print_report(results)
    if args.json:  # again in the table's order (the runs ran in the plan's: the issue's variants first)
        write_json(args.json, results)
        print(f"wrote {args.json}")
    results["failed"] = [r for r in results["runs"] if r["status"] in ("error", "oom")]
    return results


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
