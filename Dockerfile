# syntax=docker/dockerfile:1
# The adacode worker: `adacode run` against Kafka. Built and run by docker-compose.yml.
#
#   docker build -t adacode .
#   docker run --rm -e ADACODE_KAFKA_BOOTSTRAP=host:9092 -v adacode-state:/var/lib/adacode adacode
#
# Settings: /etc/adacode/adacode.toml (mount your own over it), overridden by ADACODE_*
# environment variables (`adacode config --help-settings` lists them).

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# The worker runs torch on the CPU: the CPU-only wheel is ~200 MB instead of GBs of CUDA.
# Pass --build-arg TORCH_INDEX=https://pypi.org/simple for the default (CUDA) build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip "setuptools>=68" wheel \
    && pip install --index-url "${TORCH_INDEX}" "torch>=2.4,<3"

WORKDIR /src
# Dependencies first, from pyproject.toml alone (with empty packages): this layer is reused
# until pyproject.toml changes.
COPY pyproject.toml ./
RUN mkdir -p adacode worker quantize store \
    && touch README.md adacode/__init__.py worker/__init__.py quantize/__init__.py store/__init__.py \
    && pip install . \
    && pip uninstall -y adacode \
    && rm -rf /src/*

COPY . /src
RUN pip install --no-deps . && adacode --help >/dev/null


FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ADACODE_CONFIG=/etc/adacode/adacode.toml

COPY --from=build /opt/venv /opt/venv

RUN useradd --system --uid 10001 --home-dir /var/lib/adacode --shell /usr/sbin/nologin adacode \
    && mkdir -p /etc/adacode /var/lib/adacode/state \
    && chown -R adacode:adacode /var/lib/adacode \
    && printf '%s\n' \
        '# adacode worker settings in the container; ADACODE_* environment variables override them.' \
        'kafka_bootstrap = "kafka:9092"' \
        'state_dir = "/var/lib/adacode/state"' \
        'http_host = "0.0.0.0"' \
        'http_port = 8321' \
        'log_format = "json"' \
        > /etc/adacode/adacode.toml

USER adacode
WORKDIR /var/lib/adacode
VOLUME ["/var/lib/adacode"]
EXPOSE 8321

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8321/healthz', timeout=4)"]

ENTRYPOINT ["adacode"]
CMD ["run", "--config", "/etc/adacode/adacode.toml"]
