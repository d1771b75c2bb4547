"""Trials per minute of a trial pack (`search.pack.run_pack`) against the same K trials run alone, in one run.

    python -m bench.trial_packs --threads 1                          # logreg, mlp, cnn, frozen head; K 1..16, CPU
    python -m bench.trial_packs --device cuda --images 3500 --image-size 64 --epochs 3

For each family and each K, K members of the family's reference setting (one batch size, image size and
epoch budget) that differ as a search's trials do (optimizer kind, learning rate, schedule, loss, dropout,
weight decay, see `member_params`) are trained
- as one pack: `run_pack` on one batch stream;
- alone, one after another in this process: `run_trial` per member, with the pack's data seed;
- on CUDA (or with --processes), as K worker processes at once, one trial each: the way several workers share
  one GPU today. Each process loads its data and builds its CUDA context before a common start, untimed.
Every trial builds its model(s), trains and validates every epoch. Before the timed runs each family trains
one solo trial and one pack of 2, untimed (kernel choice, the frozen backbone's feature cache, allocator
growth); the pack and solo runs then alternate --repeats times and the medians are shown, so a burst of
other work on a shared machine hits both alike. The ratio is pack trials/min over solo trials/min (the same
as solo seconds over pack seconds). On CUDA the table adds the GPU memory at peak: the pack's, the largest
solo trial's, and the sum over the K processes (each process's own peak; CUDA contexts not included).

A second table (--steps, default on) times one training step, forward, per-member loss, backward and the
optimizer, on one shared batch, the three ways in turn, --step-repeats times (medians): the K models stepped alone (torch.optim), the fused stack
(`models.stacked.StackedNet`: one wide GEMM or convolution for the shared input, batched matmul and grouped
convolutions after) and `torch.func.stack_module_state` + `functional_call` + `vmap` (randomness
"different"; its dropout rate is member 0's for all, and batch norm's running statistics are not tracked,
which vmap cannot update in place). This is the measurement that chose the fused form.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.plain import (BenchData, add_common_arguments, apply_threads, clock, image_config, load_bench_data,
                         parse_models, print_table)
from search.family import Family, get_family
from search.pack.optim import KINDS, StackedOptimizer
from search.pack.runner import Member, build_pack, member_losses, run_pack
from search.pipeline import resolve_device
from search.training import LOSSES, SCHEDULES, make_loss, make_optimizer
from search.trial import build_model, run_trial, uses_feature_cache

DEFAULT_MODELS = "logreg,mlp,cnn,mobilenet_frozen"
DATA_SEED = 1
STOPPED = "stopped: another process failed"


def member_params(family: Family, base: dict[str, Any], index: int) -> dict[str, Any]:
    """Member `index` of a pack: `base` with the member parameters a search would vary, each within its limits."""
    params = dict(base)
    kind = KINDS[index % len(KINDS)]
    params["optimizer"] = kind
    scale = 10.0 if kind == "sgd" else 1.0  # SGD wants larger steps than the adaptive optimizers
    params["lr"] = float(base["lr"]) * scale * 1.5 ** ((index % 5) - 2)
    params["momentum"] = (0.9, 0.5, 0.8)[index % 3]
    params["weight_decay"] = (0.0, 1e-4, 1e-3)[index % 3]
    params["loss"] = LOSSES[index % len(LOSSES)]
    params["label_smoothing"] = 0.1
    params["lr_schedule"] = SCHEDULES[(index // 2) % len(SCHEDULES)]
    params["warmup_epochs"] = index % 2
    for name in family.pack_members:
        if name.startswith("dropout") and name in params:
            params[name] = (0.0, 0.1, 0.3)[index % 3]
    params = family.relevant({**family.defaults(), **params})
    family.validate(params)
    return params


def members_of(family: Family, base: dict[str, Any], k: int) -> list[Member]:
    return [Member(member_params(family, base, i), seed=100 + i) for i in range(k)]


def _peak_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device: torch.device, start: int) -> int:
    return torch.cuda.max_memory_allocated(device) - start if device.type == "cuda" else 0


def time_pack(family: Family, members: list[Member], data: BenchData, config, device) -> tuple[float, int]:
    """(seconds, peak device bytes) of one pack trial of `members`."""
    start = _peak_start(device)
    started = clock(device)
    results = run_pack(family, members, data.parts, config, device, DATA_SEED)
    seconds = clock(device) - started
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise SystemExit(f"{family.name}: a pack member failed: {failed[0]!r}")
    return seconds, _peak(device, start)


def time_solo(family: Family, members: list[Member], data: BenchData, config, device) -> tuple[float, int]:
    """(seconds, largest peak device bytes) of the members' trials run one after another."""
    seconds, peak = 0.0, 0
    for member in members:
        start = _peak_start(device)
        started = clock(device)
        run_trial(family, member.params, data.parts, config, device, member.seed, data_seed=DATA_SEED)
        seconds += clock(device) - started
        peak = max(peak, _peak(device, start))
    return seconds, peak


# --- K worker processes, one trial each ---------------------------------------------------------------


def _process_trial(args: argparse.Namespace, name: str, params: dict[str, Any], seed: int, start: Any,
                   results: Any) -> None:
    """A worker process: load the data, build the context, wait for the common start, run one trial."""
    try:
        apply_threads(args)
        device = resolve_device(args.device)
        family = get_family(name)
        data = load_bench_data(args, args.image_size or family.image_size, Path(args.image_cache), device)
        config = dataclasses.replace(image_config(args, Path(args.feature_cache)), image_size=data.size)
        run_trial(family, {**params, "epochs": 1}, data.parts, config, device, seed, data_seed=DATA_SEED)  # warm
        peak_start = _peak_start(device)
        start.wait()
        run_trial(family, params, data.parts, config, device, seed, data_seed=DATA_SEED)
        clock(device)
        results.put((time.perf_counter(), _peak(device, peak_start), None))
    except threading.BrokenBarrierError:
        results.put((time.perf_counter(), 0, STOPPED))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which says which process failed
        results.put((time.perf_counter(), 0, repr(error)))
        start.abort()  # the others and the parent stop waiting


def time_processes(args: argparse.Namespace, family: Family, members: list[Member]) -> tuple[float, int]:
    """(seconds from the common start until the last of K worker processes ends, sum of their peaks)."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(len(members) + 1), context.Queue()
    processes = [context.Process(target=_process_trial, args=(args, family.name, m.params, m.seed, start, results))
                 for m in members]
    for process in processes:
        process.start()
    started = None
    try:
        with contextlib.suppress(threading.BrokenBarrierError):  # a process failed before the start
            start.wait(timeout=600)
            started = time.perf_counter()
        ends = [results.get(timeout=3600) for _ in processes]  # one message from each process
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    errors = [error for _, _, error in ends if error and error != STOPPED]
    if errors or started is None:
        raise SystemExit(f"{family.name}: a worker process failed: {errors[0] if errors else 'no start'}")
    return max(end for end, _, _ in ends) - started, sum(peak for _, peak, _ in ends)


# --- one training step: K alone, fused, vmap ------------------------------------------------------------


def _interleaved_medians(steps: dict[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step function, run in turn `repeats` times after one untimed run each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = clock(device)
            step()
            times[name].append(clock(device) - started)
    return {name: statistics.median(values) for name, values in times.items()}


def step_times(family: Family, members: list[Member], data: BenchData, config, device, repeats: int
               ) -> tuple[float, float, float | None]:
    """Seconds of one training step of every member: (K alone, fused pack, vmap); vmap None if it failed."""
    pack, source = build_pack(family, members, data.parts, config, device, DATA_SEED)
    x, y = next(iter(source.train_batches(1)))
    models = [build_model(family, m.params, data.parts, config, device, m.seed) for m in members]
    trained = [model.head if uses_feature_cache(model) else model for model in models]
    optimizers = [make_optimizer(t, m.params) for t, m in zip(trained, members)]
    losses = [make_loss(m.params) for m in members]

    def alone() -> None:
        for module, optimizer, loss_fn in zip(trained, optimizers, losses):
            module.train()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(module(x), y).backward()
            optimizer.step()

    lrs = pack.learning_rates(1)

    def fused() -> None:
        pack.train_steps([(x, y)], lrs)

    steps = {"alone": alone, "fused": fused}
    vmapped = _vmap_step(trained, members, x, y, lrs[0], pack.smoothing)
    try:
        vmapped()
        steps["vmap"] = vmapped
    except Exception as error:  # noqa: BLE001 - vmap does not support every layer: the table says so
        print(f"  {family.name}: vmap step failed: {type(error).__name__}: {error}")
    seconds = _interleaved_medians(steps, repeats, device)
    return seconds["alone"], seconds["fused"], seconds.get("vmap")


def _vmap_step(trained: list[torch.nn.Module], members: list[Member], x: torch.Tensor, y: torch.Tensor,
               lr: torch.Tensor, smoothing: torch.Tensor | None):
    from torch.func import functional_call, stack_module_state, vmap

    copies = [copy.deepcopy(module).train() for module in trained]
    for module in copies:
        torch.func.replace_all_batch_norm_modules_(module)
    params, buffers = stack_module_state(copies)
    base = copy.deepcopy(copies[0]).to("meta")

    def forward(p, b, inputs):
        return functional_call(base, (p, b), (inputs,))

    batched = vmap(forward, in_dims=(0, 0, None), randomness="different")
    stacked = list(params.values())
    optimizer = StackedOptimizer(stacked, [m.params["optimizer"] for m in members],
                                 [float(m.params["weight_decay"]) for m in members],
                                 [float(m.params.get("momentum", 0.0)) for m in members])

    def step() -> None:
        logits = batched(params, buffers, x)
        optimizer.zero_grad()
        member_losses(logits, y, smoothing).sum().backward()
        optimizer.step(lr)

    return step


# --- the tables -------------------------------------------------------------------------------------------


def _mib(count: int) -> str:
    return f"{count / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.trial_packs", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, images=500, models=DEFAULT_MODELS)
    parser.add_argument("--packs", default="1,2,4,8,16", help="pack sizes K (default 1,2,4,8,16)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    parser.add_argument("--image-size", type=int, default=32,
                        help="image side for every family (default 32; 0: each family's own)")
    parser.add_argument("--repeats", type=int, default=1, help="pack and solo runs per K, medians shown (default 1)")
    parser.add_argument("--processes", action=argparse.BooleanOptionalAction,
                        help="also run K worker processes at once (default: on CUDA only)")
    parser.add_argument("--steps", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one training step: K alone, fused, vmap (default on)")
    parser.add_argument("--step-repeats", type=int, default=5, help="timed steps per step measurement (default 5)")
    args = parser.parse_args()
    names = parse_models(args.models)
    device = resolve_device(args.device)
    threads = apply_threads(args)
    packs = sorted({int(k) for k in args.packs.split(",") if k.strip()})
    if not packs or packs[0] < 1 or args.repeats < 1:
        raise SystemExit("--packs takes sizes of at least 1, and --repeats at least 1")
    processes = device.type == "cuda" if args.processes is None else args.processes
    args.image_size = args.image_size or None
    with tempfile.TemporaryDirectory(prefix="bench-packs-") as folder:
        args.image_cache, args.feature_cache = f"{folder}/images", f"{folder}/features"
        step_rows = []
        for name in names:
            family = get_family(name)
            if not family.pack_members:
                print(f"{name}: declares no pack_members, so it trains in packs of one; skipped")
                continue
            data = load_bench_data(args, args.image_size or family.image_size, Path(args.image_cache), device)
            config = dataclasses.replace(image_config(args, Path(args.feature_cache)), image_size=data.size)
            overrides = {"epochs": args.epochs, **({"batch_size": args.batch_size} if args.batch_size else {})}
            base = family.resolve(overrides)
            run_trial(family, base, data.parts, config, device, 0, data_seed=DATA_SEED)  # untimed warm-up
            time_pack(family, members_of(family, base, 2), data, config, device)
            rows = []
            for k in packs:
                members = members_of(family, base, k)
                packed, alone = [], []
                for _ in range(args.repeats):
                    packed.append(time_pack(family, members, data, config, device))
                    alone.append(time_solo(family, members, data, config, device))
                pack_s = statistics.median(s for s, _ in packed)
                solo_s = statistics.median(s for s, _ in alone)
                row = [str(k), f"{pack_s:.2f}", f"{solo_s:.2f}", f"{60 * k / pack_s:.1f}", f"{60 * k / solo_s:.1f}",
                       f"{solo_s / pack_s:.2f}x"]
                if processes:
                    process_s, process_peak = time_processes(args, family, members)
                    row += [f"{60 * k / process_s:.1f}", f"{process_s / pack_s:.2f}x"]
                if device.type == "cuda":
                    row += [_mib(max(p for _, p in packed)), _mib(max(p for _, p in alone))]
                    row += [_mib(process_peak)] if processes else []
                rows.append(row)
                print(f"  {name} K={k}: pack {pack_s:.2f}s, {k} solo {solo_s:.2f}s ({solo_s / pack_s:.2f}x)",
                      flush=True)
                if args.steps and name != "mobilenet_finetune":
                    step_rows.append([name, str(k), *_step_row(family, members, data, config, device,
                                                               args.step_repeats)])
            header = ["K", "pack s", "K solo s", "pack trials/min", "solo trials/min", "ratio pack/solo"]
            if processes:
                header += ["K processes trials/min", "ratio pack/processes"]
            if device.type == "cuda":
                header += ["pack GPU MiB", "solo GPU MiB"] + (["K processes GPU MiB"] if processes else [])
            size = data.parts["train"].images.shape[-1]
            print(f"\n{family.title} ({name}): reference setting, batch {base['batch_size']}, {size}px, "
                  f"{args.epochs} epoch(s), {len(data.parts['train'])} train / {len(data.parts['val'])} val images, "
                  f"device {device}, {threads} thread(s)"
                  + (f", median of {args.repeats}" if args.repeats > 1 else ""))
            print_table(header, rows)
            print()
    if step_rows:
        print(f"one training step of K members on one batch (median of {args.step_repeats}), milliseconds; "
              "ratio = K alone / that")
        print_table(["model", "K", "K alone ms", "fused ms", "vmap ms", "fused ratio", "vmap ratio"], step_rows)


def _step_row(family: Family, members: list[Member], data: BenchData, config, device, repeats: int) -> list[str]:
    alone, fused, vmapped = step_times(family, members, data, config, device, repeats)
    vmap_ms = f"{1000 * vmapped:.1f}" if vmapped is not None else "failed"
    vmap_ratio = f"{alone / vmapped:.2f}x" if vmapped is not None else "-"
    return [f"{1000 * alone:.1f}", f"{1000 * fused:.1f}", vmap_ms, f"{alone / fused:.2f}x", vmap_ratio]


if __name__ == "__main__":
    main()
