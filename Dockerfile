# The adaptation service, serving the shipped bundle saved_models/nav2d-maml on port 3000.
#   docker build -t metarl-adaptation .
#   docker run --rm -p 3000:3000 metarl-adaptation
# Without a Docker engine: make image (buildah), make image-test (build, run, call it).
# Configuration: METARL_* environment variables (docs/serving.md), e.g. -e METARL_STORE_SIZE=4096,
# -e METARL_STORE_URL=redis://redis:6379/0, -e METARL_API_TOKEN_FILE=/run/secrets/metarl_token.
#
# BASE: python:3.11-slim by default; any Debian-based image with Python 3.11 or with apt works
# (make image-base imports a Debian bookworm made by debootstrap, whose python3 is 3.11).
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=True \
    PATH=/opt/venv/bin:$PATH

# A base without Python (bare Debian) gets Debian's python3 and venv; then a virtual environment
# (Debian's python refuses system-wide pip installs, PEP 668).
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin metarl
WORKDIR /app

# Behind a TLS-intercepting proxy, give pip its CA for the build only, as a bind mount that no
# layer keeps: buildah bud -v "$SSL_CERT_FILE":/run/build-ca.pem:ro ... (scripts/image.py does).
# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN if [ -s /run/build-ca.pem ]; then export PIP_CERT=/run/build-ca.pem; fi \
    && mkdir -p metarl_tf serving \
    && touch metarl_tf/__init__.py serving/__init__.py \
    && pip install . \
    && pip uninstall -y metarl-tf \
    && rm -rf metarl_tf serving build *.egg-info

COPY metarl_tf ./metarl_tf
COPY serving ./serving
RUN if [ -s /run/build-ca.pem ]; then export PIP_CERT=/run/build-ca.pem; fi \
    && pip install --no-deps . && rm -rf build *.egg-info \
    && python -c "import serving.client, metarl_tf"
COPY saved_models/nav2d-maml ./saved_models/nav2d-maml

ENV METARL_BUNDLE=/app/saved_models/nav2d-maml
USER metarl
EXPOSE 3000

# Ready only once the bundle is loaded and the adaptation function is compiled.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status != 200)"]

CMD ["bentoml", "serve", "serving.service:AdaptationService", "--host", "0.0.0.0", "--port", "3000", "--working-dir", "/app"]
