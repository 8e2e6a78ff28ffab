"""A scale model of a run at 64-512 nodes: what restarts, the stop agreement and checkpoints cost,
and how often to checkpoint (Young-Daly), as docs/slurm.md reports it.

    .venv/bin/python bench/sim_scale.py [--trials 200] [--rendezvous-clients 512]

Two parts measured on this machine, the rest a model whose inputs are printed with the results:

- **Rendezvous** (measured): torchrun's c10d rendezvous is a TCPStore on one host that every
  node's agent joins with a few store operations (add its number, write its address, wait for
  the others). Here K client threads do exactly that against one real `torch.distributed.TCPStore`
  (K = 64..512), each with its own connection, and the time until all have seen all is timed.
- **Stop agreement** (modelled): each step ends with a one-element all-reduce over every rank
  (trainers/preemption.py). A tree all-reduce of 8 bytes costs about 2 log2(W) alpha; alpha =
  5 us per hop is an InfiniBand figure (NCCL's own small-message latency is of that order).
- **Checkpoints** (modelled): bytes = 16 per parameter (bf16 weights, fp32 master, Adam's two
  moments) + 2 per parameter of export-ready weights are not written at checkpoints; sharded, so
  each node writes 1/N. Blocking time = a node's share over its host-copy bandwidth (6.5 GB/s,
  bench/bench_checkpoint.py's 1.95 GB in 0.30 s on this VM); the write finishes in the
  background at min(file system, N x node link) bandwidth.
- **Failures** (modelled, Monte Carlo): a node fails at a constant rate; the default node MTBF
  (6,300 h) is what the Llama 3 report's figure gives (419 unexpected interruptions in 54 days on
  16,384 GPUs = 2,048 nodes of 8). A failure loses the work since the last checkpoint and a
  restart (requeue wait + rendezvous + load). Efficiency = useful hours / wall hours over a
  14-day run, checkpointing every tau, for tau = Young-Daly sqrt(2 C MTBF_job) and fixed 30/60/240
  minutes.
"""

from __future__ import annotations

import argparse
import math
import random
import threading
import time


def measure_rendezvous(clients: int) -> float:
    """Seconds until `clients` agents have each joined one TCPStore and seen every other."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=120))
    port = server.port
    start = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
            start.wait()
            store.add("joined", 1)
            store.set(f"addr/{i}", f"node{i}:29400")
            while int(store.add("joined", 0)) < clients:
                time.sleep(0.001)
            store.get(f"addr/{(i + 1) % clients}")
        except BaseException as e:  # noqa: BLE001 - reported after the join
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def efficiency(nodes: int, tau_h: float, cost_h: float, restart_h: float, node_mtbf_h: float,
               days: float, rng: random.Random) -> float:
    """Useful hours / wall hours of one simulated run."""
    rate = nodes / node_mtbf_h
    wall, useful, goal = 0.0, 0.0, days * 24 * 0.8  # train until 80% of the days are useful work
    failure_in = rng.expovariate(rate)
    while useful < goal:
        work = min(tau_h, goal - useful)
        span = work + (cost_h if useful + work < goal else 0.0)  # the last stretch needs no save
        if failure_in < span:  # a node fails before this stretch is saved: its work is lost
            wall += failure_in + restart_h
            failure_in = rng.expovariate(rate)
            continue
        failure_in -= span
        wall += span
        useful += work
    return useful / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--rendezvous-clients", type=int, default=512)
    ap.add_argument("--params-b", type=float, default=70.0, help="model size, billions of parameters")
    ap.add_argument("--node-mtbf-h", type=float, default=6300.0)
    ap.add_argument("--host-copy-gbs", type=float, default=6.5)
    ap.add_argument("--fs-gbs", type=float, default=200.0, help="file system aggregate write bandwidth")
    ap.add_argument("--node-link-gbs", type=float, default=25.0)
    ap.add_argument("--requeue-min", type=float, default=5.0, help="requeue wait until the job runs again")
    ap.add_argument("--days", type=float, default=14.0)
    args = ap.parse_args()

    print("rendezvous (measured here: one TCPStore, K agents joining and seeing all):")
    rdzv = {}
    for k in (64, 128, 256, 512):
        if k > args.rendezvous_clients:
            break
        rdzv[k] = min(measure_rendezvous(k) for _ in range(3))
        print(f"  {k:4d} agents: {rdzv[k]:.3f} s")

    ckpt_bytes = 16 * args.params_b * 1e9
    print(f"\nmodel: {args.params_b:g}B parameters, checkpoint {ckpt_bytes / 1e12:.2f} TB (16 B/param), node MTBF "
          f"{args.node_mtbf_h:,.0f} h, requeue wait {args.requeue_min:g} min, {args.days:g}-day runs, "
          f"{args.trials} trials each")
    header = (f"{'nodes':>5} {'ranks':>6} {'stop all-reduce':>15} {'ckpt blocks':>11} {'ckpt written':>12} "
              f"{'job MTBF':>9} {'Young-Daly':>10} {'eff YD':>7} {'eff 30m':>7} {'eff 60m':>7} {'eff 240m':>8}")
    print(header)
    rng = random.Random(0)
    for nodes in (64, 128, 256, 512):
        ranks = 8 * nodes
        allreduce_us = 2 * math.log2(ranks) * 5.0
        blocks_s = ckpt_bytes / nodes / (args.host_copy_gbs * 1e9)
        written_s = ckpt_bytes / (min(args.fs_gbs, nodes * args.node_link_gbs) * 1e9)
        mtbf_h = args.node_mtbf_h / nodes
        cost_h = blocks_s / 3600
        load_h = written_s / 3600  # a restart reads the checkpoint back at the same bandwidth
        restart_h = args.requeue_min / 60 + rdzv.get(nodes, max(rdzv.values()) * nodes / max(rdzv)) / 3600 + load_h
        yd_h = math.sqrt(2 * cost_h * mtbf_h)
        effs = []
        for tau in (yd_h, 0.5, 1.0, 4.0):
            runs = [efficiency(nodes, tau, cost_h, restart_h, args.node_mtbf_h, args.days, rng)
                    for _ in range(args.trials)]
            effs.append(sum(runs) / len(runs))
        print(f"{nodes:5d} {ranks:6d} {allreduce_us:12.0f} us {blocks_s:9.1f} s {written_s:10.0f} s "
              f"{mtbf_h:7.1f} h {yd_h * 60:7.1f} min " + " ".join(f"{e:7.3f}" for e in effs[:3]) +
              f" {effs[3]:8.3f}")


if __name__ == "__main__":
    main()
