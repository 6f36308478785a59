# The adaptation service, serving the shipped bundle saved_models/nav2d-maml on port 3000.
#   docker build -t metarl-adaptation .
#   docker run --rm -p 3000:3000 metarl-adaptation
# Configuration: METARL_* environment variables (docs/serving.md), e.g. -e METARL_STORE_SIZE=4096.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=True

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin metarl
WORKDIR /app

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir -p metarl_tf serving \
    && touch metarl_tf/__init__.py serving/__init__.py \
    && pip install . \
    && pip uninstall -y metarl-tf \
    && rm -rf metarl_tf serving

COPY metarl_tf ./metarl_tf
COPY serving ./serving
RUN pip install --no-deps . && python -c "import serving.client, metarl_tf"
COPY saved_models/nav2d-maml ./saved_models/nav2d-maml

ENV METARL_BUNDLE=/app/saved_models/nav2d-maml
USER metarl
EXPOSE 3000

# Ready only once the bundle is loaded and the adaptation function is compiled.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status != 200)"]

CMD ["bentoml", "serve", "serving.service:AdaptationService", "--host", "0.0.0.0", "--port", "3000", "--working-dir", "/app"]
