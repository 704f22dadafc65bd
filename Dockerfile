# One image for every role: `veil gateway`, `veil worker` or `veil serve`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md nats.conf gateway.py ./
COPY actors actors
COPY bus bus
COPY contracts contracts
COPY config config
COPY edge edge
COPY eventstore eventstore
COPY veil veil
# The `otel` extra: a container exports traces when OTEL_EXPORTER_OTLP_ENDPOINT is set.
# The embedding model is built once, into the image, not at every container start.
RUN pip install --no-cache-dir '.[otel]' \
    && python -c "from actors.memory.embedder import default_embedder; default_embedder()"
EXPOSE 8000
CMD ["veil", "serve", "--host", "0.0.0.0"]
