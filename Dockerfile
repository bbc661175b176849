# sqlproxy: a drop-in replacement for gcr.io/cloud-sql-connectors/cloud-sql-proxy (PostgreSQL).
#   docker build -t sqlproxy .
#   docker run --rm -p 127.0.0.1:5432:5432 sqlproxy --private-ip PROJECT:REGION:INSTANCE
# Inside the image sqlproxy listens on 0.0.0.0 and serves its health checks on :9090, so the
# cloud-sql-proxy `command:` of a compose file works unchanged and the container reports
# healthy through HEALTHCHECK (no curl needed).

FROM python:3.11-slim AS build
RUN python3 -m venv /opt/sqlproxy
COPY pyproject.toml README.md /src/
COPY sqlproxy /src/sqlproxy
RUN /opt/sqlproxy/bin/pip install --no-cache-dir --disable-pip-version-check /src \
    && find /opt/sqlproxy -name '__pycache__' -prune -exec rm -rf {} + \
    && rm -rf /opt/sqlproxy/lib/python3*/site-packages/pip*

FROM python:3.11-slim
COPY --from=build /opt/sqlproxy /opt/sqlproxy
ENV PATH=/opt/sqlproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CSQL_PROXY_ADDRESS=0.0.0.0 \
    CSQL_PROXY_HEALTH_CHECK=true \
    CSQL_PROXY_HTTP_ADDRESS=0.0.0.0
# Where --client-tls-dir keeps its CA; a volume mounted here inherits this owner.
RUN mkdir -p /var/lib/sqlproxy/tls && chown -R 65532:65532 /var/lib/sqlproxy
# A fixed, unprivileged user (as distroless's nonroot) that owns nothing else in the image.
USER 65532:65532
EXPOSE 5432 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["sqlproxy", "healthcheck", "--probe", "startup"]
ENTRYPOINT ["sqlproxy"]
