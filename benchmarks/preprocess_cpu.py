"""preprocess_data throughput: rows/s with --workers 1 and 2 on a generated pairwise parquet file.

Generates a seeded 50k-row alpaca-style pairwise parquet file and the tiny world's tokenizer
(built if missing), then runs the pipeline with each worker count (median of --repeats),
measuring rows/s and the peak RSS of the process tree (psutil, sampled every 50 ms).

    python benchmarks/preprocess_cpu.py [--rows 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from examples.tiny_world import world

    rng = random.Random(0)
    prompts, chosen, rejected = [], [], []
    for _ in range(rows):
        place, time_ = rng.choice(world.PLACES), rng.choice(world.TIMES)
        prompts.append(world.prompt_text(place, time_))
        chosen.append(world.descriptive(place, time_, rng.randint(2, 4), rng))
        rejected.append(world.plain(rng))
    pq.write_table(pa.table({"instruction": prompts, "chosen": chosen, "rejected": rejected}), path)


class PeakRSS:
    """Peak resident memory of this process and its children while active."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, False

        def sample():
            while not self.stop:
                try:
                    rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                except Exception:
                    rss = 0
                self.peak = max(self.peak, rss)
                time.sleep(0.05)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from dpo_rl.data.preprocess import PreprocessOptions, preprocess
    from examples.tiny_world.build import ARTIFACTS, build_tokenizer

    tokenizer_dir = ARTIFACTS / "tokenizer"
    if not tokenizer_dir.exists():
        build_tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pairs.parquet"
        make_parquet(src, args.rows)
        results = {1: [], 2: []}
        peaks = {1: 0, 2: 0}
        for _ in range(args.repeats):
            for workers in (1, 2):
                opts = PreprocessOptions(input=str(src), tokenizer_name_or_path=str(tokenizer_dir),
                                         output_prefix=f"{tmp}/out{workers}", handler_name="AlpacaStylePairwiseHandler",
                                         prompt_type="chatml", map_keys={"prompt": "instruction"}, workers=workers,
                                         log_interval=0)
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    summary = preprocess(opts, progress=False)
                    results[workers].append(summary.written / (time.perf_counter() - start))
                peaks[workers] = max(peaks[workers], rss.peak)
        identical = all(Path(f"{tmp}/out1_{f}.bin").read_bytes() == Path(f"{tmp}/out2_{f}.bin").read_bytes()
                        for f in ("prompt", "chosen", "rejected"))
    print(f"\npreprocess {args.rows} pairwise rows (parquet, chatml, tiny BPE tokenizer), median of {args.repeats}\n")
    print("| workers | rows/s | peak RSS (MiB, process tree) |")
    print("|---|---|---|")
    for workers in (1, 2):
        print(f"| {workers} | {statistics.median(results[workers]):.0f} | {peaks[workers] / 2**20:.0f} |")
    print(f"\nspeed-up with 2 workers: {statistics.median(results[2]) / statistics.median(results[1]):.2f}x; "
          f"outputs identical: {identical}")


if __name__ == "__main__":
    main()
