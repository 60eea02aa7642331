# crm-relay: slim, non-root, health-checked; the wheel installed, dependencies as the lock pins them.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CRM_RELAY_DATA_DIR=/var/lib/crm-relay \
    PORT=8080 \
    LOG_FORMAT=json
WORKDIR /src
# dependencies first, exactly as the lock pins them (hashes checked): a code change reuses this layer
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
# then the service as a user gets it: a wheel (SQL inside), not the source tree on a PYTHONPATH
COPY pyproject.toml README.md ./
COPY service ./service
COPY sql ./sql
RUN pip wheel --no-cache-dir --no-deps -w /tmp/dist . \
 && pip install --no-cache-dir --no-deps /tmp/dist/*.whl \
 && rm -rf /tmp/dist /src \
 && useradd --system --uid 10001 --home-dir /var/lib/crm-relay --create-home relay
WORKDIR /var/lib/crm-relay
USER relay
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"]
# exec form: SIGTERM reaches crm-relay itself, which drains and exits 0 within 10 s
ENTRYPOINT ["crm-relay"]
CMD ["serve"]
