#!/usr/bin/env bash
# docker-compose.yml's two nodes in real containers, checked: build the image (from a Debian base
# made with debootstrap when no registry hub is reachable), start the two services on their own
# network, and compare rank 0's final.pt with one plain process's (float64, within 1e-10).
# Not in the test suite: it takes minutes and about 1.5 GB. Run as root with dockerd running;
# docs/clusters.md has a measured run.
#   COMPOSE=auto  `docker compose` (v2), else `docker-compose` (v1), else `docker run` with the
#                 compose file's settings; COMPOSE=none forces the last
USAGE="[BASE_IMAGE=<an image with python3; default: built with debootstrap>] [DEBIAN_MIRROR=http://deb.debian.org/debian] \
[WHEELS=<folder holding torch's wheel>] [CA_BUNDLE=<pip's CA bundle>] [COMPOSE=auto|none] launch/container_proof.sh"
set -euo pipefail
source "$(dirname "$0")/common.sh"
FLAGS=(--dtype float64 --steps 6 --global-batch-size 16 --seed 5 --model mlp)
work=$(mktemp -d)
project=ddp-proof-$$

for tool in docker tar; do
  command -v "$tool" > /dev/null || { echo "launch: $tool not found; install docker.io (Debian)" >&2; exit 2; }
done
docker info > /dev/null 2>&1 || { echo "launch: no docker daemon answers; start dockerd first" >&2; exit 2; }

cleanup() {
  if [ -n "${compose:-}" ]; then $compose -p "$project" -f "$work/compose.yml" down -v > /dev/null 2>&1 || true; fi
  docker rm -f "$project-node0" "$project-node1" > /dev/null 2>&1 || true
  docker network rm "$project" > /dev/null 2>&1 || true
  docker volume rm "$project" > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# 1. A base image from Debian's own packages: python3 with venv, and CA certificates.
if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE=ddp_demo-base:bookworm
  if ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    command -v debootstrap > /dev/null || { echo "launch: debootstrap not found; apt-get install debootstrap" >&2; exit 2; }
    echo "== debootstrap bookworm (minbase + python3, python3-venv, ca-certificates)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" \
      "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$work/debootstrap.log" || { tail "$work/debootstrap.log"; exit 1; }
    tar -C "$work/rootfs" -c . | docker import - "$BASE_IMAGE" > /dev/null
    rm -rf "$work/rootfs"
    echo "base image $BASE_IMAGE imported after ${SECONDS} s"
  fi
fi

# 2. The image, from the repository's Dockerfile, with the optional extras it picks up.
echo "== docker build (base $BASE_IMAGE)"
mkdir "$work/context"
git -C "$root" ls-files -co --exclude-standard -z | tar -C "$root" --null -T - -c | tar -C "$work/context" -x
if [ -n "${WHEELS:-}" ]; then mkdir "$work/context/wheels" && cp "$WHEELS"/*.whl "$work/context/wheels/"; fi
if [ -n "${CA_BUNDLE:-}" ]; then cp "$CA_BUNDLE" "$work/context/ca-bundle.crt"; fi
# With local wheels PyPI serves the rest; otherwise PyTorch's CPU index serves torch.
index=${WHEELS:+https://pypi.org/simple}
docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" ${index:+--build-arg TORCH_INDEX_URL="$index"} \
  -t ddp_demo:cpu "$work/context" > /dev/null
echo "image ddp_demo:cpu: $(docker image inspect -f '{{.Size}}' ddp_demo:cpu | awk '{printf "%.2f GB", $1 / 1e9}'), built after ${SECONDS} s"

# 3. The two services, with docker-compose.yml's environment, on a network of their own.
compose=
if [ "${COMPOSE:-auto}" != none ]; then
  if docker compose version > /dev/null 2>&1; then compose="docker compose"
  elif command -v docker-compose > /dev/null; then compose=docker-compose; fi
fi
start=$(date +%s.%N)
if [ -n "$compose" ]; then
  echo "== $compose up ($($compose version --short 2>/dev/null || $compose version | head -n 1))"
  # The trainer's flags go after the service's own command (--preflight); the image is the one built above.
  cmd=$(printf '"%s", ' --preflight "${FLAGS[@]}")
  printf 'services:\n  node0: {image: ddp_demo:cpu, command: [%s]}\n  node1: {image: ddp_demo:cpu, command: [%s]}\n' \
    "${cmd%, }" "${cmd%, }" > "$work/override.yml"
  cp "$root/docker-compose.yml" "$work/compose.yml"
  $compose -p "$project" -f "$work/compose.yml" -f "$work/override.yml" up -d --no-build > /dev/null 2>&1
  nodes=("$($compose -p "$project" -f "$work/compose.yml" ps -q node0)" "$($compose -p "$project" -f "$work/compose.yml" ps -q node1)")
else
  echo "== docker run, two services as docker-compose.yml describes them"
  docker network create "$project" > /dev/null && docker volume create "$project" > /dev/null
  nodes=()
  for node in node0 node1; do
    # The service's environment, ${X:-default} read as compose reads it when X is unset.
    mapfile -t env < <("$PYTHON" - "$root/docker-compose.yml" "$node" <<'EOF'
import re, sys
from ruamel.yaml import YAML
service = YAML(typ="safe").load(open(sys.argv[1]))["services"][sys.argv[2]]
default = re.compile(r"[$][{](\w+):-([^}]*)[}]")
for name, value in service["environment"].items():
    print(name + "=" + default.sub(r"\2", str(value)))
EOF
)
    docker run -d --name "$project-$node" --hostname "$node" --network "$project" --network-alias "$node" \
      --shm-size 1g -v "$project:/runs" "${env[@]/#/--env=}" ddp_demo:cpu --preflight "${FLAGS[@]}" > /dev/null
    nodes+=("$project-$node")
  done
fi
codes=$(timeout 600 docker wait "${nodes[@]}" | tr '\n' ' ')
wall=$(echo "$(date +%s.%N) - $start" | bc)
docker logs "${nodes[0]}" > "$work/node0.log" 2>&1; docker logs "${nodes[1]}" > "$work/node1.log" 2>&1
docker cp "${nodes[0]}:/runs/latest/final.pt" "$work/final.pt" 2>/dev/null || true
echo "exit codes (node0 node1): $codes; wall time from start to both exited: ${wall%.*} s"

# 4. One plain process on this machine, and the comparison.
"$PYTHON" -m ddp_demo.train "${FLAGS[@]}" --out "$work/single" > /dev/null 2>&1
"$PYTHON" - "$work" "$codes" <<'EOF'
import sys
from pathlib import Path
import torch
work, codes = Path(sys.argv[1]), sys.argv[2].split()
logs = "".join((work / f"node{i}.log").read_text() for i in (0, 1))
print("\n".join(line for line in logs.splitlines() if "training mlp on" in line or "checks passed" in line))
if codes != ["0", "0"] or not (work / "final.pt").exists():
    sys.exit(f"container_proof: FAILED: exit codes {codes}; the nodes said:\n{logs[-3000:]}")
a, b = (torch.load(work / p, weights_only=True) for p in ("final.pt", "single/final.pt"))
diff = max(float((a[k] - b[k]).abs().max()) for k in a)
print(f"max |final.pt (2 containers) - final.pt (1 process)| = {diff:.3g}")
sys.exit(0 if diff <= 1e-10 else f"container_proof: FAILED: difference {diff:.3g} > 1e-10")
EOF
echo "container_proof: OK after ${SECONDS} s (docker engine $(docker version -f '{{.Server.Version}}'))"
