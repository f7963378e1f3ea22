"""XNNPACK's int8 vs fp32 GEMM kernels, timed natively: what int8 can gain on CPUs with and without VNNI.

Run:  python benchmarks/xnnpack_kernels.py --xnnpack PATH [--repeats 30]
      (PATH: a checkout of https://github.com/google/XNNPACK; needs a C compiler: $CC, else clang, else gcc.
      Use clang, as LiteRT's own build does: gcc 12 spills an accumulator of the fp32 kernel to the stack, which
      makes that kernel about 2.5x slower than in LiteRT and the int8 kernels look better than they are.)
Writes benchmarks/results/xnnpack_kernels.md and prints it.

LiteRT runs convolutions with XNNPACK, which picks its GEMM kernels from CPUID once per process
(``src/configs/gemm-config.c``: ``init_qs8_qc8w_gemm_config`` for int8, ``init_f32_gemm_config`` for fp32), and
nothing in LiteRT's options changes that choice, so an AVX-512 machine cannot run a whole model the way an
AVX2-only CPU would. The kernels themselves are plain functions, though, and an AVX-512 CPU executes AVX2 code
natively. This script compiles the kernels each CPU class gets (AVX2 + FMA: ``qs8_qc8w_gemm_3x8c8__avx2``, which
sign-extends int8 to int16 and multiplies with ``vpmaddwd``, against ``f32_gemm_5x16__fma3_broadcast``; AVX-512
VNNI: ``7x16c8__avx512vnni`` with ``vpdpbusd`` against ``f32_gemm_7x32__avx512f``) from the checkout with
`benchmarks/xnnpack_gemm.c` and times them on DenseNet121's convolution shapes. It also checks that the
installed LiteRT library was built with kernels of these names (their source file names are in the binary).

It measures kernels, not models (no im2col, threading, requantisation or ops outside the GEMMs), on this CPU's
microarchitecture: on an AVX-512 machine the AVX2 rows show what those instructions do on *this* core, which
can differ from an AVX2-only CPU's (e.g. how many ``vpmaddwd`` per cycle it issues).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
HARNESS = Path(__file__).resolve().parent / "xnnpack_gemm.c"

# (name, source under src/, compiler flags as XNNPACK's CMake build uses for that ISA, needs AVX-512)
KERNELS = [
    ("f32_gemm_5x16__fma3_broadcast", "f32-gemm/gen/f32-gemm-5x16-minmax-fma3-broadcast.c", ["-mavx2", "-mfma", "-mf16c"], False),
    ("qs8_qc8w_gemm_3x8c8__avx2", "qs8-qc8w-gemm/gen/qs8-qc8w-gemm-3x8c8-minmax-fp32-avx2.c", ["-mavx2", "-mfma", "-mf16c"], False),
    ("f32_gemm_7x32__avx512f_broadcast", "f32-gemm/gen/f32-gemm-7x32-minmax-avx512f-broadcast.c", ["-mavx512f"], True),
    ("qs8_qc8w_gemm_7x16c8__avx512vnni_prfm", "qs8-qc8w-gemm/gen/qs8-qc8w-gemm-7x16c8-minmax-fp32-avx512vnni-prfm.c",
     ["-mavx512f", "-mavx512cd", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"], True),
]
PAIRS = [("AVX2 + FMA", "qs8_qc8w_gemm_3x8c8__avx2", "f32_gemm_5x16__fma3_broadcast"),
         ("AVX-512 VNNI", "qs8_qc8w_gemm_7x16c8__avx512vnni_prfm", "f32_gemm_7x32__avx512f_broadcast")]
# DenseNet121 at 224 px as GEMMs (M = output pixels, N = output channels, K = input channels x kernel area)
SHAPES = [
    ("block 1, 1×1 bottleneck (256 ch in)", 3136, 128, 256),
    ("block 1, 3×3 growth conv", 3136, 32, 1152),
    ("block 3, 1×1 bottleneck (1024 ch in)", 196, 128, 1024),
    ("block 3, 3×3 growth conv", 196, 32, 1152),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xnnpack", type=Path, required=True, help="XNNPACK source checkout (has include/ and src/)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds per shape, fastest kept")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for xnnpack_kernels.md")
    args = parser.parse_args()
    from dsl_fed.io import atomic_write
    from dsl_fed.stats import cpu_vector_extensions

    if not (args.xnnpack / "src" / "xnnpack" / "microparams.h").is_file():
        print(f"{args.xnnpack}: not an XNNPACK checkout (no src/xnnpack/microparams.h)", file=sys.stderr)
        return 2
    extensions = cpu_vector_extensions()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(extensions)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dsl_fed_xnnpack_") as tmp:
        binary = build(args.xnnpack, Path(tmp), avx512)
        rows = []
        for label, m, n, k in SHAPES:
            out = subprocess.run([str(binary), str(m), str(n), str(k), str(args.repeats)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append((label, m, n, k, {r["kernel"]: r["seconds"] for r in map(json.loads, out.splitlines())}))
    report = render(rows, args, extensions, commit(args.xnnpack), time.time() - started)
    target = atomic_write(args.out / "xnnpack_kernels.md", report)
    print(report)
    print(f"written to {target}", file=sys.stderr)
    return 0


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("clang") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("no C compiler found (set CC)")
    return cc


def build(checkout: Path, tmp: Path, avx512: bool) -> Path:
    """Compile the harness and the kernels (each with its ISA's flags) into one executable."""
    cc = compiler()
    (tmp / "pthreadpool.h").write_text("typedef struct pthreadpool* pthreadpool_t;\n")  # xnnpack.h names the type only
    common = ["-O2", "-DNDEBUG", f"-I{checkout}", f"-I{checkout / 'include'}", f"-I{checkout / 'src'}", f"-I{tmp}"]
    objects = []
    for name, source, flags, needs_avx512 in KERNELS:
        if needs_avx512 and not avx512:
            continue
        objects.append(str(tmp / f"{name}.o"))
        subprocess.run([cc, *common, *flags, "-c", str(checkout / "src" / source), "-o", objects[-1]], check=True)
    binary = tmp / "xnnpack_gemm"
    subprocess.run([cc, *common, *(["-DWITH_AVX512"] if avx512 else []), str(HARNESS), *objects, "-o", str(binary)],
                   check=True)
    return binary


def first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.strip() for line in out.splitlines() if line.strip()), "unknown")


def litert_library() -> tuple[Path | None, bytes]:
    """The installed LiteRT shared library that holds XNNPACK (the one naming XNNPACK's kernel sources)."""
    try:
        import ai_edge_litert
    except ImportError:
        return None, b""
    for library in sorted(Path(ai_edge_litert.__file__).parent.glob("*.so")):
        blob = library.read_bytes()
        if b"qs8-qc8w-gemm" in blob:
            return library, blob
    return None, b""


def litert_kernels(blob: bytes) -> dict[str, bool]:
    """Which of the kernels' source file names occur in LiteRT's library (it was built with them or not)."""
    return {name: Path(source).name.encode() in blob for name, source, _, _ in KERNELS} if blob else {}


def commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def render(rows: list, args: argparse.Namespace, extensions: list[str], sha: str, seconds: float) -> str:
    from dsl_fed.stats import cpu_name

    load = os.getloadavg()
    measured = [name for name in (k[0] for k in KERNELS) if name in rows[0][4]]
    library, blob = litert_library()
    in_litert = litert_kernels(blob)
    found = re.search(rb"clang version [\d.]+|GCC: \([^)]*\) [\d.]+", blob)  # the ELF .comment section
    built_with = found.group(0).decode() if found else "an unknown compiler"
    lines = [
        "# XNNPACK int8 vs fp32 GEMM kernels",
        "",
        f"Command: `python benchmarks/xnnpack_kernels.py --xnnpack XNNPACK --repeats {args.repeats}` · XNNPACK "
        f"commit {sha} · CPU {cpu_name()}, vector extensions {', '.join(extensions) or 'none reported'} · one "
        f"thread, CPU time, fastest of {args.repeats} interleaved rounds · load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (other jobs share the CPU) · {seconds / 60:.1f} min",
        "",
        f"Compiled here with {first_line([compiler(), '--version'])} (`-O2`, each kernel with its ISA's flags); the "
        f"installed LiteRT library (`{library.name if library else 'not found'}`) was built with {built_with}.",
        "",
        "Kernel names in the installed LiteRT library: "
        + (", ".join(f"`{name}` {'yes' if ok else '**no**'}" for name, ok in in_litert.items()) or "LiteRT not installed"),
        "",
        "| GEMM (DenseNet121, 224 px) | M × N × K | " + " | ".join(f"`{n}` GMAC/s" for n in measured) + " |",
        "|---|---|" + "---:|" * len(measured),
    ]
    for label, m, n, k, times in rows:
        lines.append(f"| {label} | {m} × {n} × {k} | "
                     + " | ".join(f"{m * n * k / times[name] / 1e9:.1f}" for name in measured) + " |")
    lines += ["", "| CPU class | int8 kernel time / fp32 kernel time (per shape) | ≤ 0.6 on every shape |", "|---|---|---|"]
    for label, int8, fp32 in PAIRS:
        if int8 not in rows[0][4]:
            lines.append(f"| {label} | not measured (this CPU lacks the extension) | – |")
            continue
        ratios = [times[int8] / times[fp32] for *_, times in rows]
        lines.append(f"| {label} | {', '.join(f'{r:.2f}' for r in ratios)} | {'yes' if max(ratios) <= 0.6 else '**no**'} |")
    avx2 = [times[PAIRS[0][1]] / times[PAIRS[0][2]] for *_, times in rows]
    lines += ["", f"With the kernels XNNPACK gives a CPU that has AVX2 but no VNNI, an int8 multiply-add took "
              f"{min(avx2):.2f}–{max(avx2):.2f}× the time of an fp32 one here, so a model whose time goes mostly "
              f"into these GEMMs {'cannot' if min(avx2) > 0.6 else 'can'} reach int8 ≤ 0.6× fp32 latency on such a "
              "CPU by quantisation settings alone (they do not change the kernel)."]
    if "avx512f" in extensions:
        lines += ["", "The AVX2 + FMA row ran the AVX2 kernels on this AVX-512 CPU; an AVX2-only CPU executes the same "
                  "instructions on another microarchitecture, so its ratio can differ (not measured here)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
