# One image for every node: python, torch, ddp_demo and the launch scripts.
# CPU torch by default; docker-compose.gpu.yml passes a CUDA wheel index as TORCH_INDEX_URL.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app

# torch first, in its own layer: it is the big download and changes least often.
COPY requirements-cpu.txt ./
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
        -r requirements-cpu.txt

COPY pyproject.toml README.md ./
COPY ddp_demo ddp_demo
RUN pip install --no-cache-dir .
COPY launch launch

# python3 here is the image's, with ddp_demo installed (the scripts fall back to it without a .venv).
ENTRYPOINT ["/app/launch/compose.sh"]
