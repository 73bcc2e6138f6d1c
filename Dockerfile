# One image for the worker, retrainer and simulator of compose.yaml.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# xgboost's wheel needs the OpenMP runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY app ./app
COPY streams ./streams
COPY gpu_kernels ./gpu_kernels
COPY training ./training
COPY sim ./sim
COPY bench ./bench
COPY lab ./lab
COPY agent ./agent
COPY api ./api
COPY drain ./drain
RUN pip install . && useradd --create-home --uid 10001 zhuge && mkdir -p /data && chown zhuge /data

USER zhuge
ENV ZHUGE_MODEL_STORE=/data/models ZHUGE_HISTORY_URL=/data/history ZHUGE_SNAPSHOT_DIR=/data/snapshots ZHUGE_STATE_DIR=/data/state
CMD ["zhuge", "--help"]
