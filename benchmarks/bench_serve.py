"""Ray Serve vs a bare FastAPI + torch server under a bounded HTTP load, on real chest X-rays.

Two servers on 127.0.0.1, same checkpoint and the same preprocessing (cxr_ray.serve_predictor.Predictor):
  serve   cxr_ray.serving.build(...) on local Ray (Ray Serve proxy + CXRServer replica(s),
          server-side batching with @serve.batch)
  bare    one uvicorn process (a subprocess of this script) running a plain FastAPI app: one
          forward pass per request, no batching (decode + forward in FastAPI's thread pool)

Each request POSTs one real 224 px JPEG from ../shared/data/chest_xray_224/train as a raw body
(content-type image/jpeg) to /v1/predict. The load generator is this driver process (a thread
per concurrent client, each with its own requests.Session); it shares a process with neither
server. At each concurrency both servers get --warmup untimed requests, then --requests timed
ones (closed loop: every client sends its next request when the previous answer arrives).
Errors are non-200 answers and exceptions. Figures only: nothing here asserts on time.

The model is a randomly initialised --backbone at --size px saved as a checkpoint in a temporary
study directory (no downloads), or the best model of a finished study with --study DIR.

Then a bounded burst of the worst uploads of issue 12 (tests/hostile_corpus.py: decompression and
scan bombs, implausible headers, the largest accepted image) goes to the Serve replica while the
resident memory (RSS) of the replica process and of its decoder child processes is sampled every
10 ms from /proc; the answers per upload and the peaks are printed.

    .venv/bin/python benchmarks/bench_serve.py [--requests 500] [--concurrency 1 8 32]
        [--max-batch-size N] [--batch-wait-ms MS] [--replicas 1] [--study DIR]
        [--bombs 2] [--bomb-concurrency 4]
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import machine

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TRAIN = DATA / "chest_xray_224" / "train"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--requests", type=int, default=500, help="timed requests per server and concurrency "
                                                             "(default 500)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                   help="concurrent clients, one measurement each (default 1 8 32)")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed requests before each measurement (default 20)")
    p.add_argument("--max-batch-size", type=int, help="Serve @serve.batch max size (default: cxr-ray serve's)")
    p.add_argument("--batch-wait-ms", type=float, help="Serve batch wait timeout (default: cxr-ray serve's)")
    p.add_argument("--replicas", default="1", help="Serve replicas, an integer or 'auto' (default 1)")
    p.add_argument("--backbone", default="mobilenetv3_small_050",
                   help="timm backbone of the random-init model (default mobilenetv3_small_050)")
    p.add_argument("--size", type=int, default=64, help="model input size in px (default 64)")
    p.add_argument("--study", default=None, help="serve this finished study's best model instead")
    p.add_argument("--images", type=int, default=256,
                   help="distinct JPEGs cycled through by the requests (default 256)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in s (default 60)")
    p.add_argument("--bare-threads", type=int, default=0,
                   help="torch intra-op threads of the bare server (default 0: torch's default, all cores; "
                        "the Serve replica gets 1, as Ray sets OMP_NUM_THREADS to its num_cpus=1)")
    p.add_argument("--bombs", type=int, default=2,
                   help="requests per kind of hostile upload in the memory burst (default 2; 0 skips it)")
    p.add_argument("--bomb-concurrency", type=int, default=4, help="concurrent bomb requests (default 4)")
    p.add_argument("--bare-server", nargs=2, metavar=("PORT", "STUDY_DIR"),
                   help="internal: run the bare FastAPI server on 127.0.0.1:PORT and block")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or any(c < 1 for c in args.concurrency) or args.images < 1:
        p.error("--requests, --images and --concurrency must be >= 1, --warmup >= 0")
    if args.replicas != "auto" and not args.replicas.isdigit():
        p.error("--replicas: an integer or 'auto'")
    return args


# ----------------------------------------------------------------------------- the bare baseline

def bare_app(study_dir: str, threads: int):
    """A plain FastAPI app: the project's Predictor, one forward pass per request."""
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from cxr_ray.serve_limits import RequestError
    from cxr_ray.serve_predictor import Predictor

    if threads:
        torch.set_num_threads(threads)
    predictor = Predictor(model_choice(study_dir))
    app = FastAPI(title="cxr-ray bare baseline")

    def score(data: bytes) -> dict:
        pixels = predictor.pixels(data, "body")
        return predictor.result(float(predictor.probabilities([pixels])[0]))

    @app.post("/v1/predict")
    async def predict(request: Request):
        data = await request.body()
        try:
            return await run_in_threadpool(score, data)
        except RequestError as e:
            return JSONResponse({"error": e.message, "file": e.file}, status_code=e.status)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "torch_threads": torch.get_num_threads(), "device": str(predictor.device)}

    return app


def run_bare_server(port: int, study_dir: str, threads: int) -> int:
    import uvicorn
    uvicorn.run(bare_app(study_dir, threads), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)
    return 0


# ----------------------------------------------------------------------------- the model

def make_checkpoint(root: Path, backbone: str, size: int) -> Path:
    """One random-init checkpoint in the training loop's format, served with ``checkpoint=``."""
    import torch

    from cxr_ray import config, models, training

    torch.manual_seed(0)
    cfg = config.TrainConfig(backbone=backbone, image_size=size, study="bench-serve", arm=backbone,
                             spec_hash="bench")
    model = models.build_model(cfg.backbone, image_size=size).eval()  # pretrained=False: no download
    opt = training.make_optimizer(model, cfg)
    root.mkdir(parents=True)
    models.save_checkpoint(root, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1, cfg,
                           models.normalization(backbone), {"threshold": 0.5, "val_auroc": 0.5})
    return root


def model_choice(path: str):
    """A study directory's best model, or one checkpoint directory (it holds meta.json)."""
    from cxr_ray.serve_model import choose_model
    if (Path(path) / "meta.json").exists():
        return choose_model(checkpoint=path)
    return choose_model(path)


# ----------------------------------------------------------------------------- load generation

def load_images(n: int) -> list[bytes]:
    """n JPEGs spread evenly over the sorted train split (both classes), read into memory."""
    files = sorted(TRAIN.glob("*/*.jpeg"))
    step = max(1, len(files) // n)
    return [f.read_bytes() for f in files[::step][:n]]


class Client:
    """A fixed set of keep-alive sessions, one per concurrent client thread."""

    def __init__(self, url: str, concurrency: int, timeout: float):
        import requests
        self.url, self.timeout = url + "/v1/predict", timeout
        self.sessions = [requests.Session() for _ in range(concurrency)]

    def run(self, bodies: list[bytes], n: int) -> dict:
        """n requests from len(sessions) closed-loop clients; latencies of the 200s, errors."""
        lock, counter = threading.Lock(), iter(range(n))
        latencies: list[float] = []
        errors: list[str] = []

        def worker(session):
            mine, bad = [], []
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                t = time.perf_counter()
                try:
                    r = session.post(self.url, data=bodies[i % len(bodies)],
                                     headers={"content-type": "image/jpeg"}, timeout=self.timeout)
                    ok = r.status_code == 200
                    if not ok:
                        bad.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except Exception as e:  # noqa: BLE001 - every failure is an error of the run
                    ok = False
                    bad.append(f"{type(e).__name__}: {e}"[:200])
                if ok:
                    mine.append(time.perf_counter() - t)
            with lock:
                latencies.extend(mine)
                errors.extend(bad)

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in self.sessions]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"wall": time.perf_counter() - start, "latencies": latencies, "errors": errors, "n": n}

    def close(self) -> None:
        for s in self.sessions:
            s.close()


def figures(res: dict) -> dict:
    import numpy as np
    lat = np.array(res["latencies"]) * 1000
    pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
    return {"rps": len(lat) / res["wall"], "p50": pct[0], "p95": pct[1], "p99": pct[2],
            "errors": len(res["errors"]), "n": res["n"], "first_error": (res["errors"] or [None])[0]}


def wait_healthy(url: str, proc: subprocess.Popen | None, deadline_s: float, log: Path | None = None) -> dict:
    import requests
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise SystemExit(f"bench_serve: the bare server exited with {proc.returncode}:\n{tail}")
        try:
            r = requests.get(url + "/healthz", timeout=10)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"bench_serve: {url}/healthz did not answer within {deadline_s:.0f} s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop the bare server (its own session, started by this script) and whatever it started."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def histogram_delta(before: dict, after: dict) -> dict[int, int]:
    return {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}


def fmt_hist(h: dict[int, int]) -> str:
    if not h:
        return "(none)"
    images = sum(k * v for k, v in h.items())
    mean = images / sum(h.values())
    return " ".join(f"{k}:{v}" for k, v in sorted(h.items())) + f"  (size:count; {images} images, " \
        f"mean batch {mean:.1f})"


# ----------------------------------------------------------------------------- memory under a bomb burst

def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def replica_pid(app: str) -> int:
    """The Serve replica of ``app`` on this machine (Ray titles it ray::ServeReplica:APP:...)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"ServeReplica:{app}:".encode() in cmdline.read_bytes():
                return int(cmdline.parent.name)
        except OSError:
            continue
    raise SystemExit(f"bench_serve: no process of the Serve replica of {app!r} found in /proc")


def child_pids(parent: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


class RssSampler(threading.Thread):
    """Peak RSS of a process and (summed) of its children, sampled every 10 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.peak_children, self.done = pid, rss_mib(pid), 0.0, threading.Event()

    def run(self):
        children, refreshed = child_pids(self.pid), time.time()
        while not self.done.wait(0.01):
            if time.time() - refreshed > 0.5:  # decoders are replaced when they are killed
                children, refreshed = child_pids(self.pid), time.time()
            self.peak = max(self.peak, rss_mib(self.pid))
            self.peak_children = max(self.peak_children, sum(rss_mib(c) for c in children))


def bomb_burst(url: str, app: str, rounds: int, concurrency: int) -> None:
    import collections
    import concurrent.futures

    import requests
    sys.path.insert(0, str(REPO / "tests"))
    import hostile_corpus
    bombs = hostile_corpus.bombs()
    kinds = {"PNG": "image/png", "DICOM": "application/dicom", "JPEG": "image/jpeg"}
    pid = replica_pid(app)
    before, before_children = rss_mib(pid), sum(rss_mib(c) for c in child_pids(pid))
    print(f"\nbomb burst: {len(bombs)} kinds x {rounds} requests, {concurrency} concurrent, POST /v1/predict "
          f"(replica pid {pid})", flush=True)

    def send(name: str) -> str:
        kind = next(v for k, v in kinds.items() if k in name)
        t = time.perf_counter()
        try:
            r = requests.post(url + "/v1/predict", data=bombs[name], headers={"content-type": kind}, timeout=300)
            return f"{r.status_code} in {time.perf_counter() - t:.2f} s"
        except requests.RequestException as e:
            return f"{type(e).__name__} after {time.perf_counter() - t:.2f} s"

    sampler = RssSampler(pid)
    sampler.start()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda n: (n, send(n)), [n for n in bombs for _ in range(rounds)]))
    sampler.done.set()
    sampler.join()
    by_name = collections.defaultdict(list)
    for name, answer in answers:
        by_name[name].append(answer)
    for name, got in by_name.items():
        print(f"  {name} ({len(bombs[name]) / 1024:,.0f} KiB): {'; '.join(got)}", flush=True)
    alive = requests.get(url + "/healthz", timeout=60).status_code
    print(f"  replica RSS: {before:.0f} MiB before, peak {sampler.peak:.0f} MiB during the burst "
          f"(+{sampler.peak - before:.0f} MiB); decoder processes (sum): {before_children:.0f} MiB before, peak "
          f"{sampler.peak_children:.0f} MiB; /healthz afterwards: {alive}", flush=True)


# ----------------------------------------------------------------------------- main

def main() -> int:
    args = parse_args()
    if args.bare_server:
        return run_bare_server(int(args.bare_server[0]), args.bare_server[1], args.bare_threads)
    if not TRAIN.is_dir():
        print(f"bench_serve: data folder {TRAIN} is absent; this benchmark needs the shared real data at {DATA} "
              f"(see its README.md). Skipped: nothing measured.", file=sys.stderr)
        return 0
    if args.study and not Path(args.study, "best.json").is_file():
        print(f"bench_serve: {args.study}: no best.json; is the study finished?", file=sys.stderr)
        return 2

    print(f"bench_serve: at start: {machine()}", flush=True)
    bodies = load_images(args.images)
    print(f"  {len(bodies)} JPEGs from {TRAIN} ({sum(map(len, bodies)) / len(bodies) / 1024:.1f} KiB mean), "
          f"{args.requests} timed + {args.warmup} warm-up requests per server and concurrency "
          f"{' '.join(map(str, args.concurrency))}", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    bare = None
    ray_started = False
    try:
        if args.study:
            study = Path(args.study).resolve()
            what = f"best model of study {study}"
        else:
            study = make_checkpoint(Path(tmp.name) / "checkpoint", args.backbone, args.size)
            what = f"random-init {args.backbone} at {args.size} px (temporary checkpoint {study})"
        print(f"  model: {what}", flush=True)

        # (b) the bare server: its own process and session, CPU only like the Serve replica
        from cxr_ray import runtime
        bare_port = runtime.free_port()
        log = Path(tmp.name) / "bare.log"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        with open(log, "w") as fh:
            bare = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--bare-server",
                                     str(bare_port), str(study), "--bare-threads", str(args.bare_threads)],
                                    cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        bare_url = f"http://127.0.0.1:{bare_port}"

        # (a) Ray Serve on a local Ray instance (never a cluster named by RAY_ADDRESS: this is localhost)
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # replica logs to files, not this console
        import ray
        from ray import serve

        from cxr_ray import serving
        if args.max_batch_size is None:  # cxr-ray serve's own settings
            args.max_batch_size = serving.MAX_BATCH_SIZE
        if args.batch_wait_ms is None:
            args.batch_wait_ms = serving.BATCH_WAIT_MS
        t = time.perf_counter()
        ray_started = not ray.is_initialized()
        runtime.connect(num_cpus=2, quiet=True)
        serve_port = runtime.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        where = {"checkpoint": str(study)} if (study / "meta.json").exists() else {"study_dir": str(study)}
        serve.run(serving.build(**where, replicas=args.replicas, max_batch_size=args.max_batch_size,
                                batch_wait_ms=args.batch_wait_ms), name="bench-serve", route_prefix="/")
        serve_url = f"http://127.0.0.1:{serve_port}"
        serve_health = wait_healthy(serve_url, None, 120)
        print(f"  serve: {serve_url}  replicas {args.replicas}, max_batch_size {args.max_batch_size}, "
              f"batch_wait_ms {args.batch_wait_ms:g}, 1 CPU per replica (torch threads 1); ready in "
              f"{time.perf_counter() - t:.1f} s; /healthz forward {serve_health['forward_ms']:.1f} ms", flush=True)
        bare_health = wait_healthy(bare_url, bare, 180, log)
        print(f"  bare:  {bare_url}  uvicorn, 1 process, no batching, torch threads "
              f"{bare_health['torch_threads']}, device {bare_health['device']}", flush=True)

        # same model and preprocessing: one image, one answer
        import requests
        answers = []
        for name, url in (("serve", serve_url), ("bare", bare_url)):
            r = requests.post(url + "/v1/predict", data=bodies[0], headers={"content-type": "image/jpeg"}, timeout=60)
            if r.status_code != 200:
                raise SystemExit(f"bench_serve: {name} answered HTTP {r.status_code} to a valid JPEG: {r.text[:500]}")
            answers.append(r.json())
        diff = abs(answers[0]["probability"] - answers[1]["probability"])
        print(f"  parity: P(serve) {answers[0]['probability']:.6f}  P(bare) {answers[1]['probability']:.6f}  "
              f"|diff| {diff:.1e}{'' if diff < 1e-4 else '  WARNING: the servers disagree'}", flush=True)

        results: dict[tuple[str, int], dict] = {}
        hists: dict[int, dict[int, int]] = {}
        stats_url = serve_url + "/v1/stats"
        print(f"\n{'server':<6} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'errors':>7}", flush=True)
        for c in args.concurrency:
            for name, url in (("bare", bare_url), ("serve", serve_url)):
                client = Client(url, c, args.timeout)
                try:
                    if args.warmup:
                        client.run(bodies, max(args.warmup, c))
                    before = requests.get(stats_url, timeout=30).json()["batch_sizes"] if name == "serve" else {}
                    res = figures(client.run(bodies, args.requests))
                    if name == "serve":
                        hists[c] = histogram_delta(before, requests.get(stats_url, timeout=30).json()["batch_sizes"])
                finally:
                    client.close()
                results[name, c] = res
                print(f"{name:<6} {c:>4} {res['rps']:8.1f} {res['p50']:8.1f} {res['p95']:8.1f} {res['p99']:8.1f} "
                      f"{res['errors']:>4}/{res['n']}", flush=True)
                if res["first_error"]:
                    print(f"         first error: {res['first_error']}", flush=True)

        print("\nthroughput ratio serve / bare (target at concurrency 32: >= 1.0)")
        for c in args.concurrency:
            b, s = results["bare", c]["rps"], results["serve", c]["rps"]
            print(f"  concurrency {c:>3}: {s / b if b else float('nan'):6.2f}x  ({s:.1f} vs {b:.1f} req/s)")
        if 32 in args.concurrency:
            b, s = results["bare", 32]["rps"], results["serve", 32]["rps"]
            print(f"  target serve >= bare at concurrency 32: {'met' if s >= b else 'NOT met'}")
        if 8 in args.concurrency:
            p99 = results["serve", 8]["p99"]
            print(f"serve p99 at concurrency 8: {p99:.1f} ms (target < 250 ms: {'met' if p99 < 250 else 'NOT met'})")
        else:
            print("serve p99 at concurrency 8: not measured (8 is not in --concurrency)")
        one = " (one replica's view: /v1/stats answers per replica)" if args.replicas != "1" else ""
        print(f"serve batch sizes per concurrency, timed requests only{one}:")
        for c in args.concurrency:
            print(f"  concurrency {c:>3}: {fmt_hist(hists[c])}")
        total = requests.get(stats_url, timeout=30).json()
        print(f"  whole run (GET /v1/stats, incl. warm-up and parity): "
              f"{fmt_hist({int(k): v for k, v in total['batch_sizes'].items()})}")
        if args.bombs:
            bomb_burst(serve_url, "bench-serve", args.bombs, args.bomb_concurrency)
    finally:
        if bare is not None:
            stop_process_group(bare)
        if ray_started:
            try:
                from ray import serve
                serve.shutdown()
            finally:
                import ray
                ray.shutdown()
        tmp.cleanup()
    print(f"at end: {machine()}  (other work on the machine lowers every figure; compare rows of one run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
