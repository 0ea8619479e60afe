# The roomshard image: the directory and the shard (`roomshard directory|shard ...`), as
# infra/kubernetes/ runs them. Build: docker build -t roomshard:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY roomshard roomshard
COPY directory directory
COPY shard shard
COPY router_rules router_rules
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
# A fixed non-root user (the manifests' runAsUser); the root file system can stay read-only.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin roomshard
USER 10001
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["roomshard"]
