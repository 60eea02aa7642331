# crm-relay: slim, non-root, health-checked; the wheel installed, dependencies as the lock pins them.
#   docker build -t crm-relay .        (BuildKit, the default builder since Docker 23)
#   docker run -p 8080:8080 -v crm-relay-data:/var/lib/crm-relay crm-relay
# The base is a tag, not a digest: pin it for reproducible builds with
#   --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest of the tag you tested>
ARG PYTHON_IMAGE=python:3.11-slim

# Stage 1: the dependencies, exactly as requirements.lock pins them (hashes checked), in a venv.
# Only a change of the lock rebuilds this stage; a code change reuses it.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
# bytecode compiled once here (hash-based: valid whatever mtimes the copy between stages keeps),
# so the read-only image never tries to write it at start
RUN /opt/venv/bin/pip install --no-compile --require-hashes -r /tmp/requirements.lock \
 && /opt/venv/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/venv

# Stage 2: the service as a user gets it: a wheel (SQL inside), not the source tree.
FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY sql ./sql
RUN /opt/venv/bin/pip wheel --no-deps -w /dist .

# Stage 3: what runs. tini is PID 1: it forwards SIGTERM to crm-relay and reaps what is
# re-parented to it (the embedded PostgreSQL runs detached; crm-relay stops it at exit).
# Kubernetes has no `docker run --init`, so it is in the image.
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends 'tini=0.19.*' \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/crm-relay --create-home \
      --shell /usr/sbin/nologin relay
# the dependencies: their own layer, shared by every image built from the same lock
COPY --from=deps /opt/venv /opt/venv
# then the wheel (a small layer of its own); the wheel file itself is mounted, not copied in
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    /opt/venv/bin/pip install --no-compile --no-deps /dist/crm_relay-*.whl \
 && /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash \
      /opt/venv/lib/python3.*/site-packages/service
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRM_RELAY_DATA_DIR=/var/lib/crm-relay \
    PORT=8080 \
    LOG_FORMAT=json
WORKDIR /var/lib/crm-relay
# the spool and, without DATABASE_URL, the embedded PostgreSQL: must outlive the container
VOLUME ["/var/lib/crm-relay"]
# by number: Kubernetes' runAsNonRoot can check it; the passwd entry exists (PostgreSQL's initdb
# looks the user up)
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"]
# exec form: SIGTERM reaches tini, then crm-relay, which drains and exits 0 within 10 s
ENTRYPOINT ["/usr/bin/tini", "--", "crm-relay"]
CMD ["serve"]
