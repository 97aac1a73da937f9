# PatchCast: one image for every role (worker, edge, monitor, workers, health); the command picks it.
#
#   docker build -t patchcast .
#   docker run --rm patchcast --help
#
# CPU inference. torch and torchvision must be a matched pair (timm imports torchvision.ops at import
# time); the CPU-only wheels keep the image small. Models from the offline zoo (shared/zoo) are
# bundled when present at build time; datasets are mounted at run time, never copied in.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Heavy, rarely changing layer first.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.6.0" "torchvision==0.21.0"

COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY patchcast/ patchcast/
COPY edge_node/ edge_node/
COPY inference_worker/ inference_worker/
COPY broker/ broker/
COPY config/ config/

RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app patchcast

USER patchcast

ENTRYPOINT ["patchcast"]
CMD ["worker"]
