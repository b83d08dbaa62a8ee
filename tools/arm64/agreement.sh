#!/usr/bin/env bash
# Does the int8 model give the same digits on ARM64 as on x86? Emulated with qemu-user.
#
#   sudo tools/arm64/agreement.sh [OUT_DIR]          (default OUT_DIR: reports/arm64)
#
# 1. installs Debian's qemu-user-static, binfmt-support and debootstrap (apt-get) and registers
#    qemu-aarch64 with binfmt_misc (mounting /proc/sys/fs/binfmt_misc if needed);
# 2. builds an arm64 Debian bookworm root (debootstrap --foreign --variant=minbase with python3,
#    i.e. Python 3.11, then the second stage under qemu), cached in $ARM64_CACHE/bookworm-root;
# 3. unpacks the cp311 aarch64 wheels of numpy and onnxruntime (and onnxruntime's own
#    dependencies) from tools/arm64/check_wheels.py's cache into the root (it runs that
#    script if they are missing);
# 4. copies in the shipped int8 model, the MNIST test set and run_model.py, runs the model on
#    all 10,000 test images on x86 and under qemu-aarch64 for each of ARM64_CPUS, by default
#    QEMU_CPU=cortex-a72 (ARMv8.0, no dot product: a Raspberry Pi 4), neoverse-n1 (dot product, no
#    i8mm: a Cortex-A76 Raspberry Pi 5), max,sve=off (dot product + i8mm, NEON only) and max
#    (dot product, i8mm, SVE);
# 5. scans the instructions qemu translated inside onnxruntime's library on a short run of each
#    CPU (QEMU_LOG=in_asm), to see which int8 kernel actually ran;
# 6. compares everything with tools/arm64/compare.py: OUT_DIR/agreement.json and agreement.md.
#
# Needs root (apt-get, debootstrap, chroot, binfmt_misc), network to deb.debian.org and PyPI
# the first time, ~600 MB of disk; takes ~10 minutes the first time, ~3 minutes after.
# Not part of CI. Environment: ARM64_CACHE (default ~/.cache/mnist-edge/arm64),
# MNIST_EDGE_ARM64_WHEELS, MNIST_EDGE_CACHE_DIR (MNIST files), DEBIAN_MIRROR, PYTHON (x86 Python
# with numpy + onnxruntime, and onnx for the graph summary; default .venv/bin/python),
# ARM64_CPUS (default "cortex-a72 neoverse-n1 max,sve=off max": no dot product (Raspberry Pi 4),
# dot product without i8mm (Cortex-A76-class: Raspberry Pi 5), NEON i8mm without SVE, SVE + i8mm).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=$(realpath -m "${1:-reports/arm64}")
CACHE=${ARM64_CACHE:-$HOME/.cache/mnist-edge/arm64}
ROOT=$CACHE/bookworm-root
WHEELS=${MNIST_EDGE_ARM64_WHEELS:-$CACHE/wheels}
MNIST=${MNIST_EDGE_CACHE_DIR:-$HOME/.cache/mnist-edge/mnist}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-$REPO/.venv/bin/python}
CPUS=${ARM64_CPUS:-cortex-a72 neoverse-n1 max,sve=off max}
say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'agreement.sh: %s\n' "$*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get, debootstrap, chroot, binfmt_misc): run it with sudo"
mkdir -p "$OUT" "$CACHE"

say "host tools: qemu-user-static, binfmt-support, debootstrap"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static binfmt-support debootstrap >/dev/null
fi
qemu-aarch64-static --version | head -1 >&2

say "binfmt_misc: run aarch64 ELF files through qemu"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || die "cannot mount binfmt_misc (kernel without CONFIG_BINFMT_MISC, or a container without CAP_SYS_ADMIN): debootstrap's second stage cannot run"
fi
if ! grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
  update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
fi
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
  || die "qemu-aarch64 is registered without the F (fix-binary) flag: the interpreter would have to exist inside the chroot"

say "arm64 Debian bookworm root in $ROOT"
if [ ! -e "$ROOT/.mnist-edge-root-ok" ]; then
  rm -rf "$ROOT"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$ROOT" "$MIRROR" >"$CACHE/debootstrap1.log" 2>&1 \
    || die "debootstrap first stage failed: see $CACHE/debootstrap1.log"
  chroot "$ROOT" /debootstrap/debootstrap --second-stage >"$CACHE/debootstrap2.log" 2>&1 \
    || die "debootstrap second stage (under qemu) failed: see $CACHE/debootstrap2.log"
  touch "$ROOT/.mnist-edge-root-ok"
fi
# /proc for /proc/self/maps (the instruction scan). Not /sys: qemu-user 7.2 passes the host's x86
# /proc/cpuinfo through, and with both /proc and /sys present onnxruntime's bundled pytorch cpuinfo
# parses that x86 text as ARM and `import onnxruntime` dies with SIGSEGV (measured). Without /sys,
# cpuinfo_initialize fails cleanly and onnxruntime reads the CPU features from getauxval(AT_HWCAP,
# AT_HWCAP2) (cpuid_info.cc), which qemu sets for the emulated CPU: the same bits cpuinfo would
# report on a real device, so the same MLAS kernels are chosen.
cleanup() { umount "$ROOT/proc" 2>/dev/null || true; }
trap cleanup EXIT
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
chroot "$ROOT" /usr/bin/python3 -c 'import platform, sys; print("arm64 root:", platform.machine(), sys.version.split()[0])' >&2

say "aarch64 wheels (cp311) from $WHEELS"
need_wheels() { for p in numpy onnxruntime; do ls "$WHEELS"/cp311/"$p"-*aarch64*.whl >/dev/null 2>&1 || return 0; done; return 1; }
if need_wheels; then
  "$PY" tools/arm64/check_wheels.py --dir "$WHEELS" --python 3.11 || true
  need_wheels && die "no cp311 aarch64 wheels of numpy and onnxruntime in $WHEELS/cp311 (check_wheels.py failed?)"
fi
SITE=$ROOT/opt/mnist-edge/site
rm -rf "$ROOT/opt/mnist-edge"
mkdir -p "$SITE" "$ROOT/opt/mnist-edge/out"
"$PY" - "$WHEELS/cp311" "$SITE" <<'EOF'
import sys, zipfile, pathlib
src, dst = pathlib.Path(sys.argv[1]), sys.argv[2]
for prefix in ("numpy-", "onnxruntime-", "flatbuffers-", "packaging-", "protobuf-"):
    wheels = sorted(w for w in src.glob(prefix + "*.whl") if "aarch64" in w.name or w.name.endswith("-any.whl"))
    if not wheels:
        sys.exit(f"no {prefix}* wheel in {src}")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(dst)
    print("unpacked", wheels[-1].name, file=sys.stderr)
EOF
# Wheels are zips: restore the execute bits shared libraries need.
find "$SITE" -name '*.so*' -exec chmod 755 {} +

say "model and MNIST test set"
MODEL=$("$PY" -c 'import json,sys; m=json.load(open("models/manifest.json")); print("models/"+m["models"]["int8"]["file"])')
cp "$MODEL" "$ROOT/opt/mnist-edge/model.onnx"
for f in t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -f "$MNIST/$f" ] || die "$MNIST/$f missing: run '.venv/bin/python -m mnist_edge.training.data' first"
  cp "$MNIST/$f" "$ROOT/opt/mnist-edge/"
done
( cd "$ROOT/opt/mnist-edge" && sha256sum -c --quiet - ) <<'EOF' || die "MNIST test files do not match their sha256"
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
EOF
cp tools/arm64/run_model.py "$ROOT/opt/mnist-edge/"
printf '%s\n' "$MODEL" > "$OUT/model.txt"
# The ORT-format conversion of the same model (export/ort_format.py), made on this x86 machine:
# it must give the same digits on every CPU too.
"$PY" -c 'import sys; sys.path.insert(0, "."); from pathlib import Path; from export.ort_format import to_ort; Path(sys.argv[2]).write_bytes(to_ort(Path(sys.argv[1]).read_bytes()))' \
  "$MODEL" "$ROOT/opt/mnist-edge/model.ort"
cp "$ROOT/opt/mnist-edge/model.ort" "$OUT/model.ort"

say "x86 reference run ($("$PY" -c 'import platform; print(platform.machine())'))"
rm -f "$OUT"/*.npz "$OUT"/*.json "$OUT"/*.optimized.onnx "$OUT"/*.log "$OUT"/cpus.txt
"$PY" tools/arm64/run_model.py --model "$MODEL" --images "$MNIST/t10k-images-idx3-ubyte" --labels "$MNIST/t10k-labels-idx1-ubyte" \
  --out "$OUT/x86_64.npz" --optimized-model "$OUT/x86_64.optimized.onnx" 2>"$OUT/x86_64.ort.log"
"$PY" tools/arm64/run_model.py --model "$OUT/model.ort" --images "$MNIST/t10k-images-idx3-ubyte" --labels "$MNIST/t10k-labels-idx1-ubyte" \
  --out "$OUT/x86_64.ortfmt.npz" 2>/dev/null
echo "$CPUS" | tr ' ' '\n' | sed 's/[,=]/_/g' > "$OUT/cpus.txt"

in_root() {  # in_root CPU [VAR=VALUE ...] -- ARGS...: run python3 in the arm64 root under qemu
  local cpu=$1; shift
  local vars=()
  while [ "$1" != "--" ]; do vars+=("$1"); shift; done
  shift
  # env -i: the host's variables (OPENBLAS_CORETYPE and the like name x86 cores) stay out.
  QEMU_CPU=$cpu chroot "$ROOT" /usr/bin/env -i QEMU_CPU="$cpu" PATH=/usr/bin:/bin HOME=/root \
    PYTHONPATH=/opt/mnist-edge/site PYTHONDONTWRITEBYTECODE=1 "${vars[@]}" /usr/bin/python3 "$@"
}

for cpu in $CPUS; do
  name=${cpu//[,=]/_}
  say "qemu-aarch64 -cpu $cpu: all 10,000 test images"
  start=$(date +%s)
  in_root "$cpu" RUN_MODEL_ORT_LOG_LEVEL=1 -- /opt/mnist-edge/run_model.py --model /opt/mnist-edge/model.onnx \
    --images /opt/mnist-edge/t10k-images-idx3-ubyte --labels /opt/mnist-edge/t10k-labels-idx1-ubyte \
    --out "/opt/mnist-edge/out/$name.npz" --optimized-model "/opt/mnist-edge/out/$name.optimized.onnx" 2>"$OUT/$name.ort.log" \
    || die "the emulated run on $cpu failed: see $OUT/$name.ort.log"
  echo "  took $(( $(date +%s) - start )) s" >&2
  cp "$ROOT/opt/mnist-edge/out/$name".* "$OUT/"

  say "qemu-aarch64 -cpu $cpu: the ORT-format model on all 10,000 test images"
  in_root "$cpu" -- /opt/mnist-edge/run_model.py --model /opt/mnist-edge/model.ort \
    --images /opt/mnist-edge/t10k-images-idx3-ubyte --labels /opt/mnist-edge/t10k-labels-idx1-ubyte \
    --out "/opt/mnist-edge/out/$name.ortfmt.npz" 2>/dev/null || die "the ORT-format run on $cpu failed"
  cp "$ROOT/opt/mnist-edge/out/$name.ortfmt".* "$OUT/"

  say "qemu-aarch64 -cpu $cpu: which int8 instructions run inside onnxruntime (QEMU_LOG=in_asm, 64 images)"
  rm -f "$ROOT/tmp/qemu-$name.log" "$ROOT/tmp/maps-$name.txt"
  in_root "$cpu" QEMU_LOG=in_asm QEMU_LOG_FILENAME="/tmp/qemu-$name.log" RUN_MODEL_MAPS="/tmp/maps-$name.txt" -- \
    /opt/mnist-edge/run_model.py --model /opt/mnist-edge/model.onnx --limit 64 --single 4 \
    --images /opt/mnist-edge/t10k-images-idx3-ubyte --labels /opt/mnist-edge/t10k-labels-idx1-ubyte \
    --out "/tmp/trace-$name.npz" >/dev/null 2>&1 || die "the traced run on $cpu failed"
  # qemu opens QEMU_LOG_FILENAME after the chroot, so the log lands inside the root.
  "$PY" tools/arm64/insn_scan.py "$ROOT/tmp/qemu-$name.log" "$ROOT/tmp/maps-$name.txt" > "$OUT/$name.insn.json" \
    || die "instruction scan for $cpu failed"
  rm -f "$ROOT/tmp/qemu-$name.log"
  in_root "$cpu" QEMU_LOG=in_asm QEMU_LOG_FILENAME="/tmp/qemu-$name.log" RUN_MODEL_MAPS="/tmp/maps-$name.txt" -- \
    /opt/mnist-edge/run_model.py --model /opt/mnist-edge/model.ort --limit 64 --single 4 \
    --images /opt/mnist-edge/t10k-images-idx3-ubyte --labels /opt/mnist-edge/t10k-labels-idx1-ubyte \
    --out "/tmp/trace-$name.npz" >/dev/null 2>&1 || die "the traced ORT-format run on $cpu failed"
  "$PY" tools/arm64/insn_scan.py "$ROOT/tmp/qemu-$name.log" "$ROOT/tmp/maps-$name.txt" > "$OUT/$name.ortfmt.insn.json" \
    || die "instruction scan (ORT format) for $cpu failed"
  rm -f "$ROOT/tmp/qemu-$name.log"
done

say "compare"
"$PY" tools/arm64/compare.py "$OUT"
