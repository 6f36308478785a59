"""The adaptation service (BentoML) and its client.

Modules:
    service      the BentoML service (``bentoml serve serving.service:AdaptationService``).
    engine       adaptation and action computation behind the endpoints (no HTTP).
    validation   request checking: every bad input becomes a :class:`RequestError` (a 4xx).
    store        the bounded in-memory store of adapted policies (LRU + TTL).
    settings     configuration from ``METARL_*`` environment variables.
    schemas      the request/response models (pydantic), which also make the OpenAPI document.
    client       :class:`AdaptationClient`: httpx + numpy only, no TensorFlow.

Importing this package imports nothing heavy, so ``from serving.client import AdaptationClient``
stays TensorFlow-free.
"""
