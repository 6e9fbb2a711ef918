"""`make gpu-wheels`: the wheels benchmarks/gpu_check.sh installs on a GPU machine that reaches no package index.

Everything daytune's runtime needs beyond PyTorch (its dependencies, recursively, at the versions installed here:
the pins a submission uses too), plus bitsandbytes, nvidia-ml-py and liger-kernel, for the GPU machine's Python
and Linux x86_64. PyTorch and its CUDA libraries are not downloaded: the check uses the PyTorch installed on the GPU
machine. The bitsandbytes wheel keeps only the CUDA library for `--cuda` (one of its ~20 MB libraries instead of
all of them). Packages that publish no wheel come as source archives. gpu_check.sh installs only what the GPU
machine's Python lacks.

    python benchmarks/gpu_wheels.py --out .wheels --python-version 3.11 --cuda 128 [--exclude numpy,scipy] [--list]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIGER = "liger-kernel==0.8.5"  # train.kernels liger: the check's fused-kernel row
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "linux_x86_64")


def requirements(exclude: set[str]) -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from daytune.serve.submit import pinned_requirements

    pins = set(pinned_requirements("daytune"))
    for extra in ("bitsandbytes", "nvidia-ml-py"):
        pins |= set(pinned_requirements(extra)) | {p for p in _self_pin(extra)}
    pins.add(LIGER)  # not installed here (Triton: CUDA only); its dependencies are torch and triton
    return sorted(p for p in pins if p.split("==")[0] not in exclude)


def _self_pin(name: str) -> list[str]:
    from importlib import metadata

    try:
        return [f"{name}=={metadata.version(name)}"]
    except metadata.PackageNotFoundError:
        return []


def download(req: str, out: Path, python_version: str) -> str:
    """A wheel for the target Python and platform, else the source archive; returns which."""
    abi = "cp" + python_version.replace(".", "")
    wheel = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
             "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi,
             "--abi", "abi3", "--abi", "none", *[f"--platform={p}" for p in PLATFORMS], "-d", str(out), req]  # fmt: skip
    if subprocess.run(wheel, capture_output=True).returncode == 0:
        return "wheel"
    sdist = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
             "--no-binary=:all:", "-d", str(out), req]  # fmt: skip
    if subprocess.run(sdist, capture_output=True).returncode == 0:
        return "sdist"
    raise SystemExit(f"gpu_wheels: no wheel or source archive found for {req}")


def slim_bitsandbytes(out: Path, cuda: str) -> None:
    """Keep one CUDA library (and the CPU one) in the bitsandbytes wheel; RECORD follows."""
    for wheel in out.glob("bitsandbytes-*.whl"):
        keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.(so|dll|dylib)$")
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            dropped = {n for n in src.namelist() if re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", n)
                       and not keep.search(n)}  # fmt: skip
            for item in src.infolist():
                if item.filename in dropped:
                    continue
                data = src.read(item.filename)
                if item.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(x for x in lines if x.split(",")[0] not in dropped) + "\n").encode()
                dst.writestr(item, data)
        slim.replace(wheel)
        print(f"{wheel.name}: kept the CPU and CUDA {cuda} libraries, dropped {len(dropped)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".wheels")
    ap.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    ap.add_argument(
        "--cuda", default="128", help="the CUDA version of the GPU machine's PyTorch: 118, 121, ... 128"
    )
    ap.add_argument(
        "--exclude", default="", help="distributions the GPU machine already has, comma-separated"
    )
    ap.add_argument("--list", action="store_true", help="print what would be downloaded, download nothing")
    args = ap.parse_args()
    reqs = requirements({x.strip() for x in args.exclude.split(",") if x.strip()})
    if args.list:
        print("\n".join(reqs))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    kinds = {req: download(req, args.out, args.python_version) for req in reqs}
    slim_bitsandbytes(args.out, args.cuda)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    sdists = [r for r, k in kinds.items() if k == "sdist"]
    print(
        f"{len(reqs)} packages in {args.out} ({size:.0f} MiB)"
        + (f"; source only: {', '.join(sdists)}" if sdists else "")
    )


if __name__ == "__main__":
    main()
