# One image for every node: python, torch, ddp_demo and the launch scripts.
# CPU torch by default; docker-compose.gpu.yml passes a CUDA wheel index as TORCH_INDEX_URL.
#
# Without a registry hub: any base with python3 (3.10+, venv included) works, e.g. one built from
# Debian's packages with debootstrap (launch/container_proof.sh does that):
#   docker build --build-arg BASE_IMAGE=ddp_demo-base:bookworm -t ddp_demo:cpu .
# Two optional extras in the build context, used when present: a wheels/ folder (torch's wheel,
# where no wheel index is reachable) and ca-bundle.crt (pip's CA bundle behind a TLS-inspecting
# proxy). The bracket patterns below match them only when they are there.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app

# torch first, in its own layer: it is the big download and changes least often.
COPY requirements-cpu.txt wheel[s] ca-bundle.cr[t] ./
RUN python3 -m venv /opt/venv \
 && if [ -f ca-bundle.crt ]; then export PIP_CERT=/app/ca-bundle.crt; fi \
 && /opt/venv/bin/pip install --no-cache-dir --find-links . --index-url "$TORCH_INDEX_URL" \
        --extra-index-url https://pypi.org/simple -r requirements-cpu.txt

COPY pyproject.toml README.md ./
COPY ddp_demo ddp_demo
RUN if [ -f ca-bundle.crt ]; then export PIP_CERT=/app/ca-bundle.crt; fi \
 && /opt/venv/bin/pip install --no-cache-dir .

# The image itself: the base and the virtual environment, without the wheels and the bundle.
FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY launch launch

# python3 here is the venv's, with ddp_demo installed (the scripts fall back to it without a .venv).
ENTRYPOINT ["/app/launch/compose.sh"]
