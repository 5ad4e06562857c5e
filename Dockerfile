# One image for every newsmon service; the command picks the role (run, ingest, classify, alerts).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app
# torch from the CPU index: the default index would bring a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY services ./services
# The seeds are part of the package (newsmon.seeds): newsmon finds them from any directory.
COPY seeds ./seeds
RUN pip install .

RUN useradd --system --home /app newsmon && mkdir -p /data && chown newsmon /data
USER newsmon
# Beyond loopback the API needs NEWSMON_API_KEYS; the settings refuse to start without them.
# The ONNX export of the model is made on the first start, into the data volume.
ENV NEWSMON_DATABASE_URL=sqlite+aiosqlite:////data/newsmon.db \
    NEWSMON_HTTP_HOST=0.0.0.0 \
    XDG_CACHE_HOME=/data/cache
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["newsmon"]
CMD ["run"]
