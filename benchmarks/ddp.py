"""Training in 1 against 2 processes (torchrun, gloo, one thread each) and one all-reduce of the gradients."""
import itertools
import json
import os
import subprocess
import sys
import tempfile

import torch

from benchmarks.common import (BATCH_SIZE, QUICK, BenchData, CAPTIONS_PER_IMAGE, machine, make_bench_data,
                               make_trainer, report, report_ratio, timed, training_steps)
from data_files import base_name
from utils import atomic_path

BENCH_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")

DDP_WORLDS = (1, 2)  # processes, one thread each
DDP_WARMUP_STEPS = 3
DDP_TIMED_STEPS = 20
ALLREDUCE_ROUNDS = 20  # the all-reduce time is the fastest of this many


def ddp_section(settings):
    """Training samples per second of 1 process against 2 (torchrun, gloo, one thread each) on the bench
    data, and the time of one all-reduce of the decoder's gradients. Returns the figures."""
    info = machine()
    report("load_average_at_start", f"{info['load_average']:.2f} (1 min, {info['cores']} cores)")
    figures = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as work:
        make_bench_data(os.path.join(work, "data"), work, settings)
        for world in DDP_WORLDS:
            json_path = os.path.join(work, f"ddp{world}.json")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                       BENCH_PY, "--ddp-worker", work, "--json", json_path]
            command += ["--quick"] if settings == QUICK else []
            subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            with open(json_path, encoding="utf-8") as file:
                figures[world] = json.load(file)
            report(f"ddp_train_{world}_process", f"{figures[world]['samples_per_s']:.2f} samples/s (attention "
                                                 f"decoder, batch {BATCH_SIZE} per process, one thread each)")
    report_ratio("ddp_speedup", figures[2]["samples_per_s"] / figures[1]["samples_per_s"])
    allreduce = figures[2]["allreduce"]
    report("ddp_allreduce", f"{allreduce['seconds'] * 1e3:.2f} ms for {allreduce['parameters']:,} gradients "
                            f"({allreduce['parameters'] * 4 / 1e6:.1f} MB, gloo, 2 processes)")
    figures["load_average_at_end"] = os.getloadavg()[0]
    report("load_average_at_end", f"{figures['load_average_at_end']:.2f} (1 min)")
    return figures


def ddp_worker(work, settings, json_path):
    """One process of ddp_section (started by torchrun): timed training steps of the bench's attention
    decoder on its shard, then the all-reduce of the decoder's gradients; rank 0 writes the figures."""
    torch.set_num_threads(1)
    data = BenchData(os.path.join(work, "data"), base_name("shapes", CAPTIONS_PER_IMAGE, 0),
                     os.path.join(work, f"{settings.backbone}.pth"))
    trainer = make_trainer(data, work, settings, "attention", run_name=f"ddp{os.environ['WORLD_SIZE']}")
    ranks = trainer.ranks
    steps = training_steps(trainer)
    for _ in itertools.islice(steps, DDP_WARMUP_STEPS):
        pass
    ranks.barrier()
    captions, seconds = timed(lambda: sum(n for n, _ in itertools.islice(steps, DDP_TIMED_STEPS)))
    ranks.barrier()
    (all_captions,) = ranks.sum(captions)
    allreduce_seconds = min(timed(ranks.average_gradients, trainer.decoder_module)[1]
                            for _ in range(ALLREDUCE_ROUNDS))
    parameters = sum(p.numel() for p in trainer.decoder_module.parameters() if p.requires_grad)
    if ranks.is_main:
        with atomic_path(json_path) as tmp, open(tmp, "w", encoding="utf-8") as file:
            json.dump({"world_size": ranks.world_size, "samples_per_s": all_captions / seconds,
                       "allreduce": {"seconds": allreduce_seconds, "parameters": parameters}}, file)
    trainer.log.close()
    trainer.lock.release()
    ranks.close()

