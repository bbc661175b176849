# The sqlproxy Cloud SQL emulator with a PostgreSQL server, for docker-compose.local.yml:
# Admin API, OAuth token endpoint and GCE metadata on :8080, the instance on :3307.
FROM python:3.11-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/sqlproxy
COPY pyproject.toml README.md /src/
COPY sqlproxy /src/sqlproxy
RUN /opt/sqlproxy/bin/pip install --no-cache-dir --disable-pip-version-check /src
ENV PATH=/opt/sqlproxy/bin:$PATH \
    PYTHONUNBUFFERED=1
EXPOSE 8080 3307
# Runs as root: it starts PostgreSQL as the postgres user, as initdb requires.
ENTRYPOINT ["sqlproxy", "emulator"]
