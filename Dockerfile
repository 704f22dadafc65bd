# One image for every role: `veil gateway`, `veil worker` or `veil serve`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md nats.conf gateway.py ./
COPY actors actors
COPY bus bus
COPY eventstore eventstore
COPY veil veil
RUN pip install --no-cache-dir .
EXPOSE 8000
CMD ["veil", "serve", "--host", "0.0.0.0"]
