# The image every docker-compose.yml service of this project runs (`lifecycle <command>`).
FROM python:3.11-slim

# git: the local repo host, sandboxes and diffs shell out to it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY api_stub ./api_stub
RUN pip install --no-cache-dir .

RUN useradd --create-home --uid 10001 lifecycle \
    && mkdir -p /data \
    && chown lifecycle:lifecycle /data
USER lifecycle
ENV LIFECYCLE_DATA_DIR=/data \
    PYTHONUNBUFFERED=1

CMD ["lifecycle", "--help"]
