# crm-relay: slim, non-root, health-checked.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    # the package is imported from /app so that sql/ sits beside service/ as in the repository
    PYTHONPATH=/app \
    CRM_RELAY_DATA_DIR=/var/lib/crm-relay \
    PORT=8080 \
    LOG_FORMAT=json
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY sql ./sql
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /var/lib/crm-relay --create-home relay
USER relay
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"]
# exec form: SIGTERM reaches crm-relay itself, which drains and exits 0 within 10 s
ENTRYPOINT ["crm-relay"]
CMD ["serve"]
